import WorkspaceDisks

/// The build-step options of `airlock run` as text, parsed here so that the
/// CLI stays thin and the rules are tested in one place.
public enum BuildStepArguments {
    /// `DIR[:GUESTPATH]`: the part after the last ':' is the guest path when it
    /// starts with '/', so a host directory may itself contain ':'.
    public static func workspace(_ text: String, freeBytes: UInt64 = WorkspaceImage.defaultExtraBytes) throws(SandboxError) -> Workspace {
        let (directory, guestPath) = splitGuestPath(text)
        guard !directory.isEmpty else {
            throw .invalidConfiguration("--workspace '\(text)' names no host directory: use --workspace DIR or DIR:/GUESTPATH")
        }
        return Workspace(directory, guestPath: guestPath ?? Workspace.defaultGuestPath, freeBytes: freeBytes)
    }

    /// `IMAGE[:GUESTPATH][:ro|:rw]`, read-only unless `:rw`; mounted at
    /// GUESTPATH, or at /mnt/disk`index` when none is given.
    public static func disk(_ text: String, index: Int) throws(SandboxError) -> Disk {
        var rest = Substring(text)
        var readOnly = true
        if rest.hasSuffix(":ro") || rest.hasSuffix(":rw") {
            readOnly = rest.hasSuffix(":ro")
            rest = rest.dropLast(3)
        }
        let (path, guestPath) = splitGuestPath(String(rest))
        guard !path.isEmpty else {
            throw .invalidConfiguration("--disk '\(text)' names no image: use --disk IMAGE[:GUESTPATH][:ro|:rw]")
        }
        return Disk(path, readOnly: readOnly, guestPath: guestPath ?? "/mnt/disk\(index)")
    }

    /// `COUNT`, `COUNT:SIZE` or `:SIZE` (SIZE with K, M or G): entries and bytes of artifacts.
    public static func artifactLimits(_ text: String) throws(SandboxError) -> ArtifactLimits {
        var limits = ArtifactLimits()
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.count <= 2, !text.isEmpty else {
            throw .invalidConfiguration("--max-artifacts '\(text)' is not COUNT, COUNT:SIZE or :SIZE (e.g. 10000:1G)")
        }
        if !parts[0].isEmpty {
            guard let n = Int(parts[0]), n >= 0 else {
                throw .invalidConfiguration("--max-artifacts '\(text)': '\(parts[0])' is not a number of entries (e.g. 10000)")
            }
            limits.maxEntries = n
        }
        if parts.count == 2 {
            limits.maxBytes = UInt64(try SizeArgument.bytes(parts[1], option: "--max-artifacts"))
        }
        return limits
    }

    static func splitGuestPath(_ text: String) -> (String, String?) {
        guard let colon = text.lastIndex(of: ":") else { return (text, nil) }
        let after = text[text.index(after: colon)...]
        guard after.hasPrefix("/") else { return (text, nil) }
        return (String(text[..<colon]), String(after))
    }
}
