#if canImport(Glibc)
import Glibc
#endif

/// What the host's KVM backend needs from Airlock beyond the KVM API.
///
/// Hardware virtualization (VT-x, AMD-V) needs nothing. A PVM backend (kvm_pvm)
/// emulates guest kernel code, cannot filter CPUID and rejects a few
/// instructions; see ../shared/docs/kvm-on-this-host.md. It may also offer a
/// paravirtual interface in which the guest kernel runs natively (`GuestMode`).
/// Everything those modes need lives here, so no device model knows about them.
public struct HostProfile: Equatable, Sendable, Codable {
    public enum Backend: String, Equatable, Sendable, Codable {
        case hardware = "hardware virtualization"
        case pvm = "PVM (kvm_pvm)"
    }

    /// How the guest kernel runs.
    public enum GuestMode: String, Equatable, Sendable, Codable, CaseIterable {
        /// Hardware virtualization: an ordinary guest.
        case hardware
        /// PVM host, guest kernel code in KVM's instruction emulator (about 0.85 us an instruction).
        case pvmEmulated = "pvm-emulated"
        /// PVM host's paravirtual interface: the VMM registers a VIF page before the
        /// first instruction and the guest kernel runs natively, in hardware ring 3
        /// (guest-kernel/README.md, "PV mode").
        case pvmNative = "pvm-native"
    }

    /// Whether a guest on a PVM host may use its paravirtual interface.
    public enum PVPreference: String, Equatable, Sendable, Codable {
        /// Native mode where the interface answers and the kernel supports it.
        case auto
        /// The emulated path, always (for comparison, or a host whose interface differs).
        case off
        /// The VMM registers nothing and the guest kernel finds the interface itself (its
        /// signature MSR, with a #GP where it is absent) and registers a page early in its
        /// boot; the instructions before that run emulated. What another VMM gets; the tests
        /// use it to keep that path working.
        case kernel
    }

    public let backend: Backend
    public var pv: PVPreference

    public init(backend: Backend, pv: PVPreference = .auto) {
        self.backend = backend
        self.pv = pv
    }

    /// The kernel command-line word that forces the emulated path: the VMM then
    /// registers no VIF page, and the guest kernel does not register its own.
    public static let pvOffParameter = "airlock.pv=off"

    /// The mode a guest gets: `interfacePresent` is what the VMM's own probe of the
    /// interface found (`PVInterface.probe`), `kernelStartsInPVMode` whether the kernel
    /// image says it can start in that mode (its ELF note), `extraCommandLine` the
    /// user's parameters (which may say airlock.pv=off).
    public func guestMode(interfacePresent: Bool, kernelStartsInPVMode: Bool, extraCommandLine: String = "") -> GuestMode {
        switch backend {
        case .hardware: return .hardware
        case .pvm:
            let forcedOff = pv == .off || extraCommandLine.split(separator: " ").contains { $0 == Self.pvOffParameter }
            return interfacePresent && kernelStartsInPVMode && !forcedOff ? .pvmNative : .pvmEmulated
        }
    }

    /// Kernel command-line parameters a mode requires.
    public static func commandLineParameters(for mode: GuestMode) -> [String] {
        switch mode {
        case .hardware, .pvmNative:
            // Native mode: the kernel clears the features the host's PV mode does not
            // run (smap/smep, pcid/invpcid, xsaves) itself, uses XSAVE (xsave, xrstor
            // and the AVX/AVX-512 state run natively; xsetbv only sets KVM's copy of
            // XCR0) and keeps rodata protection (cheap natively).
            return []
        case .pvmEmulated:
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
            // hardware, so only this mode turns it off.
            // airlock.pv=off: the guest kernel would otherwise find the interface
            // and register a VIF page itself.
            return ["clearcpuid=smap,smep,popcnt,cx16,xsaveopt,xsavec,xsaves,xgetbv1,amx_tile,amx_bf16,amx_int8",
                    "rodata=off", pvOffParameter]
        }
    }

    /// Kernel command-line parameters the backend requires in its default mode
    /// (emulated on PVM; `commandLineParameters(for:)` has every mode).
    public var commandLineParameters: [String] {
        Self.commandLineParameters(for: backend == .pvm ? .pvmEmulated : .hardware)
    }

    /// Whether emulation failures on int3 and fwait are completed by the VMM (emulated mode only).
    public static func emulationAssists(for mode: GuestMode) -> Bool { mode == .pvmEmulated }

    /// Whether the VMM registers the VIF page before the first instruction in `mode`.
    public func vmmRegistersVIF(in mode: GuestMode) -> Bool { mode == .pvmNative && pv != .kernel }

    /// Whether the guest kernel starts in KVM's emulator in `mode` (and needs the assists):
    /// always in emulated mode, and for its first instructions when it registers itself.
    public func startsEmulated(in mode: GuestMode) -> Bool { mode == .pvmEmulated || (mode == .pvmNative && pv == .kernel) }

    /// Whether emulation failures on int3 and fwait are completed by the VMM in the backend's default mode.
    public var emulationAssists: Bool { backend == .pvm }

    /// Whether the VMM completes XSAVE, XRSTOR, XGETBV, RDPKRU and WRPKRU for the guest kernel
    /// (emulated mode only: natively they run on the hardware).
    public static func extendedStateAssist(for mode: GuestMode) -> Bool { mode == .pvmEmulated }

    /// Whether the backend may need the extended-state assist (it is set up with the VM,
    /// before the mode is known): any PVM host.
    public var extendedStateAssist: Bool { backend == .pvm }

    /// The name the session protocol carries: the backend and, when it is not `auto`, the
    /// PV preference ("pvm", "pvm pv=off"). The supervisor detects the profile (the jailed
    /// VMM has no /sys and a cleared environment) and the VMM uses what it is told.
    public var wireName: String {
        let base = backend == .hardware ? "hardware" : "pvm"
        return pv == .auto ? base : "\(base) pv=\(pv.rawValue)"
    }

    public init?(wireName: String) {
        let words = wireName.split(separator: " ", omittingEmptySubsequences: false)
        guard (1...2).contains(words.count) else { return nil }
        let backend: Backend
        switch words[0] {
        case "hardware": backend = .hardware
        case "pvm": backend = .pvm
        default: return nil
        }
        var pv = PVPreference.auto
        if words.count == 2 {
            guard words[1].hasPrefix("pv="), let p = PVPreference(rawValue: String(words[1].dropFirst(3))), p != .auto else { return nil }
            pv = p
        }
        self.init(backend: backend, pv: pv)
    }

    /// Detects the backend from the loaded kernel modules; `AIRLOCK_PV` in `environment`
    /// sets the preference (`off` forces the emulated path: how the test suite runs once in
    /// that mode; `kernel` leaves the registration to the guest kernel).
    public static func detect(sysModule: String = "/sys/module",
                              environment: [String: String] = HostProfile.processEnvironment()) -> HostProfile {
        var info = stat()
        let backend: Backend = stat(sysModule + "/kvm_pvm", &info) == 0 ? .pvm : .hardware
        return HostProfile(backend: backend, pv: environment["AIRLOCK_PV"].flatMap(PVPreference.init(rawValue:)) ?? .auto)
    }

    /// The process environment as a dictionary.
    public static func processEnvironment() -> [String: String] {
        var result: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { result[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        return result
    }
}
