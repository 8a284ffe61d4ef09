/// Checks a caller can make before it spends a boot: `airlock serve` runs them at
/// start-up and for each request, before the request gets a VM.
extension Sandbox {
    /// Validates `config` and the images it names (present, readable, a root
    /// filesystem with the agent), as a boot would, without booting.
    public static func preflight(_ config: SandboxConfig) throws(SandboxError) {
        _ = try ImageResolution.resolve(config)
    }

    /// Validates `command` as `run` would (a program given, sane limits, the agent's size limits).
    public static func check(_ command: Command) throws(SandboxError) {
        try validate(command)
    }
}
