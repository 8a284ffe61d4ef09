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
            // cannot execute are turned off in the guest kernel instead: clac/stac
            // (smap), smep, popcnt, and cmpxchg16b (cx16) used by SLUB.
            // XSAVE stays on: guest user code runs on the hardware with the host's
            // XCR0 (AVX, AVX-512), so the kernel must switch all of that state, and
            // the VMM completes the XSAVE/XRSTOR the emulator rejects
            // (ExtendedStateAssist). The other forms are masked so the kernel picks
            // plain standard-format XSAVE: xsaveopt, xsavec, xsaves, and xgetbv1.
            // AMX is masked because KVM here offers it to no guest (XCR0 would be
            // refused), and the kernel then never enables it.
            // rodata=off skips write-protecting kernel text and rodata, which
            // splits and rewrites page tables in emulated code: 8 s of a 49 s
            // boot here (40.6 s without). It protects the guest kernel from its
            // own bugs, not the host from the guest, and costs milliseconds on
            // hardware, so only this profile turns it off.
            return ["clearcpuid=smap,smep,popcnt,cx16,xsaveopt,xsavec,xsaves,xgetbv1,amx_tile,amx_bf16,amx_int8", "rodata=off"]
        }
    }

    /// Whether emulation failures on int3 and fwait are completed by the VMM.
    public var emulationAssists: Bool { backend == .pvm }

    /// Whether the VMM completes XSAVE, XRSTOR, XGETBV, RDPKRU and WRPKRU for the guest kernel.
    public var extendedStateAssist: Bool { backend == .pvm }

    public init(backend: Backend) { self.backend = backend }

    /// The name the session protocol carries (the supervisor detects the profile; the jailed
    /// VMM, which has no /sys, uses what it is told).
    public var wireName: String {
        switch backend {
        case .hardware: return "hardware"
        case .pvm: return "pvm"
        }
    }

    public init?(wireName: String) {
        switch wireName {
        case "hardware": self.init(backend: .hardware)
        case "pvm": self.init(backend: .pvm)
        default: return nil
        }
    }

    /// Detects the backend from the loaded kernel modules.
    public static func detect(sysModule: String = "/sys/module") -> HostProfile {
        var info = stat()
        if stat(sysModule + "/kvm_pvm", &info) == 0 { return HostProfile(backend: .pvm) }
        return HostProfile(backend: .hardware)
    }
}
