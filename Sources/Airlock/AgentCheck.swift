import RootFS

/// Whether a root filesystem can run `airlock run`: the agent must be an
/// executable file in it. Read from the image itself (RootFS, no mount), so a
/// wrong image is refused in milliseconds instead of after a boot of seconds.
enum AgentCheck {
    static func verify(rootfs: String, agentPath: String) throws(SandboxError) {
        let check: ExecutableCheck
        do { check = try RootFSCheck.findExecutable(image: rootfs, path: agentPath) } catch {
            throw .invalidConfiguration("\(error)")
        }
        if let problem = check.problem(image: rootfs, path: agentPath) {
            throw .invalidConfiguration("\(problem) (Airlock's guest agent must be there for 'airlock run')")
        }
    }
}
