#if canImport(Glibc)
import Glibc
#endif

/// What the host's KVM backend needs from Airlock beyond the KVM API.
///
/// Hardware virtualization (VT-x, AMD-V) needs nothing. A PVM backend (kvm_pvm)
/// emulates guest kernel code, cannot filter CPUID and rejects a few
/// instructions; see ../shared/docs/kvm-on-this-host.md. Everything that profile
/// needs lives here, so no device model knows about it.
public struct HostProfile: Equatable, Sendable, Codable {
    public enum Backend: String, Equatable, Sendable, Codable {
        case hardware = "hardware virtualization"
        case pvm = "PVM (kvm_pvm, guest kernel emulated)"
    }

    public let backend: Backend

    /// Kernel command-line parameters the backend requires.
    public var commandLineParameters: [String] {
        switch backend {
        case .hardware: return []
        case .pvm:
            // CPUID is not filtered on PVM, so features the instruction emulator
            // cannot execute are turned off in the guest kernel instead:
            // xsave/xrstor (noxsave), clac/stac (smap), smep, popcnt, and
            // cmpxchg16b (cx16) used by SLUB.
            // rodata=off skips write-protecting kernel text and rodata, which
            // splits and rewrites page tables in emulated code: 8 s of a 49 s
            // boot here (40.6 s without). It protects the guest kernel from its
            // own bugs, not the host from the guest, and costs milliseconds on
            // hardware, so only this profile turns it off.
            return ["noxsave", "clearcpuid=smap,smep,popcnt,cx16", "rodata=off"]
        }
    }

    /// Environment entries every command in the guest gets (the user's own win).
    public var guestEnvironment: [String] {
        switch backend {
        case .hardware: return []
        case .pvm:
            // With noxsave the guest kernel saves only legacy FPU/SSE state on
            // its context switches, yet guest user code still sees AVX in the
            // unfiltered CPUID: processes using AVX at once could see each
            // other's upper YMM halves. This keeps glibc's string functions off AVX.
            return ["GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX_Usable,-AVX2_Usable,-AVX512F_Usable"]
        }
    }

    /// Whether emulation failures on int3 and fwait are completed by the VMM.
    public var emulationAssists: Bool { backend == .pvm }

    public init(backend: Backend) { self.backend = backend }

    /// Detects the backend from the loaded kernel modules.
    public static func detect(sysModule: String = "/sys/module") -> HostProfile {
        var info = stat()
        if stat(sysModule + "/kvm_pvm", &info) == 0 { return HostProfile(backend: .pvm) }
        return HostProfile(backend: .hardware)
    }
}
