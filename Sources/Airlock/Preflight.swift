import Logging

/// Checks a caller can make before it spends a boot: `airlock serve` runs them at
/// start-up and for each request, before the request gets a VM.
extension Sandbox {
    /// Validates `config` and what it names (the images, present and readable, a root
    /// filesystem with the agent; the `airlock-vmm` executable), as a boot would, without
    /// booting. For a jailed sandbox it also sets up this process's jail supervisor, which
    /// removes the jails a killed earlier process left behind.
    public static func preflight(_ config: SandboxConfig, logger: Logger = Logger(label: "airlock.sandbox")) throws(SandboxError) {
        _ = try ImageResolution.resolve(config)
        if config.isolation == .jailed {
            _ = try VMMJail.executable(config.vmmExecutable)
            _ = try VMMJail.supervisor(logger: logger)
        }
    }

    /// Validates `command` as `run` would on a sandbox made from `config` (a program given,
    /// sane limits, an absolute working directory, the agent's size limits, a `user` the
    /// image's own account files know).
    public static func check(_ command: Command, config: SandboxConfig) throws(SandboxError) {
        try CommandValidation.check(command, config: config)
    }
}
