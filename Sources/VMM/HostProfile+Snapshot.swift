import KVM

/// What snapshots need to know about the host's KVM backend.
extension HostProfile {
    /// PVM's paravirtual mode: a guest kernel registers its VIF page by writing
    /// this MSR and from then on runs natively. KVM does not list it in
    /// KVM_GET_MSR_INDEX_LIST but reads and writes it (0x400 before any
    /// registration); writing it back into a fresh vCPU brings PV mode back
    /// (scripts/snapshot-probe.c shows both).
    public static let pvmVIFMSR: UInt32 = 0x4B56_4D10

    /// MSRs a snapshot saves beyond KVM's list.
    public var snapshotMSRs: [UInt32] {
        switch backend {
        case .hardware: return []
        case .pvm: return [Self.pvmVIFMSR]
        }
    }

    /// The host reads back the page address the guest registered, or only flag
    /// bits (0x400) when none is: a page address means PV mode is on.
    static func vifRegistered(_ value: UInt64) -> Bool { value & ~0xFFF != 0 }

    /// The saved MSRs a restore writes back: all of them, except a VIF MSR that
    /// records no registration (a guest that never entered PV mode keeps the
    /// fresh vCPU's own value).
    public func restorableMSRs(_ msrs: [MSREntry]) -> [MSREntry] {
        msrs.filter { $0.index != Self.pvmVIFMSR || Self.vifRegistered($0.value) }
    }
}

extension HostProfile {
    /// The backend's name in a snapshot's manifest (kept apart from the
    /// human-readable `Backend` raw values, which may change).
    public var snapshotBackendName: String {
        switch backend {
        case .hardware: return "hardware"
        case .pvm: return "pvm"
        }
    }

    /// The guest modes a snapshot may have been taken in to be restored on
    /// this host with this profile (and the user's kernel parameters `extra`):
    /// on PVM the emulated one always, and the native one unless the emulated
    /// path is asked for. Whether the host's interface answers is the VMM's to
    /// check (its own probe, on its own vCPU): a native snapshot it cannot run
    /// is refused there.
    public func restorableGuestModes(extraCommandLine extra: String = "") -> [GuestMode] {
        switch backend {
        case .hardware: return [.hardware]
        case .pvm:
            let forcedOff = pv == .off || extra.split(separator: " ").contains { $0 == Self.pvOffParameter }
            return forcedOff ? [.pvmEmulated] : [.pvmEmulated, .pvmNative]
        }
    }
}
