import KVM

/// What a snapshot was made from and where: the inputs a restore must share
/// with it. Written into every snapshot and checked before any VM is made
/// from it.
public struct SnapshotManifest: Equatable, Sendable {
    /// When it was made (Unix seconds), for listings.
    public var createdAt: UInt64
    /// SHA-256 (hex) of the guest kernel file, the root filesystem image, and
    /// the kernel command line the guest booted with.
    public var kernelSHA256: String
    public var rootfsSHA256: String
    public var commandLine: String
    /// The host's KVM backend ("hardware", "pvm") and how the guest kernel ran
    /// on it ("hardware", "pvm-emulated", "pvm-native").
    public var hostBackend: String
    public var guestMode: String
    public var memoryBytes: UInt64
    public var vcpuCount: Int
    /// The vCPU's TSC frequency in kHz (0 when KVM could not say).
    public var tscKHz: UInt32
    /// The size of a vCPU's XSAVE state on the host that made it.
    public var xsaveSize: Int
    /// The CPUID table the guest was given: the CPU features it saw.
    public var cpuid: CPUIDTable
    /// Pages of guest RAM the snapshot holds (touched and not all zeros), for listings.
    public var dataPages: Int

    public init(createdAt: UInt64, kernelSHA256: String, rootfsSHA256: String, commandLine: String, hostBackend: String,
                guestMode: String, memoryBytes: UInt64, vcpuCount: Int, tscKHz: UInt32, xsaveSize: Int, cpuid: CPUIDTable,
                dataPages: Int) {
        self.createdAt = createdAt; self.kernelSHA256 = kernelSHA256; self.rootfsSHA256 = rootfsSHA256
        self.commandLine = commandLine; self.hostBackend = hostBackend; self.guestMode = guestMode
        self.memoryBytes = memoryBytes; self.vcpuCount = vcpuCount; self.tscKHz = tscKHz; self.xsaveSize = xsaveSize
        self.cpuid = cpuid; self.dataPages = dataPages
    }

    public var commandLineSHA256: String { sha256Hex(Array(commandLine.utf8)) }
}

/// What a restore on this host, with these images, needs a snapshot to have
/// been made from. Fields left nil are not checked (the VMM checks the CPU
/// and TSC itself once it has a vCPU).
public struct SnapshotRequirements: Sendable {
    public var kernelSHA256: String
    public var rootfsSHA256: String
    /// The guest modes this host and configuration can restore into, each with the whole
    /// kernel command line a guest booted in that mode has (the mode's own parameters differ).
    public var commandLines: [String: String]
    public var memoryBytes: UInt64
    public var vcpuCount: Int
    public var hostBackend: String
    public var cpuid: CPUIDTable?
    public var xsaveSize: Int?

    public init(kernelSHA256: String, rootfsSHA256: String, commandLines: [String: String], memoryBytes: UInt64, vcpuCount: Int,
                hostBackend: String, cpuid: CPUIDTable? = nil, xsaveSize: Int? = nil) {
        self.kernelSHA256 = kernelSHA256; self.rootfsSHA256 = rootfsSHA256; self.commandLines = commandLines
        self.memoryBytes = memoryBytes; self.vcpuCount = vcpuCount; self.hostBackend = hostBackend
        self.cpuid = cpuid; self.xsaveSize = xsaveSize
    }

    /// The guest modes this host can restore into.
    public var guestModes: Set<String> { Set(commandLines.keys) }
}

extension SnapshotManifest {
    /// Throws `.foreign`, naming the first input that differs.
    public func check(_ r: SnapshotRequirements, path: String) throws(SnapshotError) {
        func differ(_ what: String, _ saved: String, _ here: String) -> SnapshotError {
            .foreign(path: path, detail: "it was made with \(what) \(saved), this run has \(here)")
        }
        if kernelSHA256 != r.kernelSHA256 { throw differ("the kernel of SHA-256", kernelSHA256, r.kernelSHA256) }
        if rootfsSHA256 != r.rootfsSHA256 { throw differ("the root filesystem of SHA-256", rootfsSHA256, r.rootfsSHA256) }
        if hostBackend != r.hostBackend { throw differ("the KVM backend", hostBackend, r.hostBackend) }
        guard let expected = r.commandLines[guestMode] else {
            throw .foreign(path: path, detail: "its guest ran in mode \(guestMode), this host offers \(r.guestModes.sorted().joined(separator: ", "))")
        }
        if commandLine != expected { throw differ("the kernel command line", "'\(commandLine)'", "'\(expected)'") }
        if memoryBytes != r.memoryBytes { throw differ("guest memory", "\(memoryBytes >> 20) MiB", "\(r.memoryBytes >> 20) MiB") }
        if vcpuCount != r.vcpuCount { throw differ("vCPUs:", "\(vcpuCount)", "\(r.vcpuCount)") }
        if let x = r.xsaveSize, x != xsaveSize { throw differ("an XSAVE area of", "\(xsaveSize) bytes", "\(x)") }
        if let c = r.cpuid, c != cpuid {
            throw .foreign(path: path, detail: "its guest saw other CPU features (CPUID \(cpuid.differenceSummary(c))): it was made on another kind of CPU or KVM")
        }
    }
}

extension CPUIDTable {
    /// The first leaf where two tables differ, for messages.
    public func differenceSummary(_ other: CPUIDTable) -> String {
        if entries.count != other.entries.count { return "\(entries.count) leaves here against \(other.entries.count)" }
        for (a, b) in zip(entries, other.entries) where a != b {
            func r(_ e: CPUIDEntry) -> String {
                [e.eax, e.ebx, e.ecx, e.edx].map { String($0, radix: 16) }.joined(separator: " ")
            }
            return "leaf 0x\(String(a.function, radix: 16)).\(a.index): \(r(a)) against \(r(b))"
        }
        return "no difference"
    }
}
