import AirlockOS
import KVM
import LinuxBoot
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// What `airlock doctor` reports about the host.
public struct HostReport: Sendable {
    public struct Check: Sendable {
        public let name: String
        public let ok: Bool
        public let detail: String
    }

    public let checks: [Check]
    public let profile: HostProfile
    /// The mode a guest booting the installed kernel gets, and why.
    public let guestMode: HostProfile.GuestMode
    public let guestModeReason: String
    public let images: [ImageStore.Image]
    public let imagesDirectory: String
    /// The toolchain image (`--image build`): where it is, or how to build it.
    public var toolchainImage: String = ""

    public var allOK: Bool { checks.allSatisfy(\.ok) }

    public static func gather(kvmPath: String = KVMSystem.defaultPath, store: ImageStore = ImageStore()) -> HostReport {
        var checks: [Check] = []
        let profile = HostProfile.detect()
        var interfacePresent = false
        var cpuSuits = true
        do {
            let kvm = try KVMSystem(path: kvmPath)
            if profile.backend == .pvm {
                cpuSuits = PVInterface.cpuSuitsGuestKernel()
                interfacePresent = PVInterface.probe(kvm: kvm)
            }
            checks.append(Check(name: kvmPath, ok: true, detail: "present and accessible"))
            checks.append(Check(name: "KVM API version", ok: true, detail: "\(kvm.apiVersion)"))
            for (name, present) in kvm.requiredCapabilities() {
                checks.append(Check(name: name, ok: present, detail: present ? "yes" : "missing"))
            }
        } catch {
            checks.append(Check(name: kvmPath, ok: false, detail: error.description))
        }
        let images = store.installedImages()
        // The same checks `airlock run` makes, so that a missing image and one this user may not
        // read are told apart (owner, mode), and doctor and run agree.
        func image(_ what: String, _ path: String, option: String) -> Check {
            do {
                _ = try ImageResolution.open(path, what: what, option: option, installed: true)
                return Check(name: what, ok: true, detail: path)
            } catch {
                return Check(name: what, ok: false, detail: error.description)
            }
        }
        let kernel = image("guest kernel", store.kernelPath, option: "--kernel")
        checks.append(kernel)
        let rootfs = image("root filesystem", store.rootfsPath, option: "--rootfs")
        checks.append(rootfs)
        var agentDetail = "not checked: the root filesystem above cannot be read"
        var agentOK = false
        if rootfs.ok {
            do {
                try AgentCheck.verify(rootfs: store.rootfsPath, agentPath: SandboxConfig().agentPath)
                agentOK = true
                agentDetail = "\(SandboxConfig().agentPath) in \(store.rootfsPath)"
            } catch {
                agentDetail = error.description
            }
        }
        checks.append(Check(name: "guest agent", ok: agentOK, detail: agentDetail))
        // Optional: its absence is information, not a failure.
        let toolchain = store.rootfsPath(image: ImageStore.toolchainImage)
        var toolchainDetail = "not installed (optional: 'make rootfs-build' for airlock run --image build)"
        if ImageStore.exists(toolchain) {
            do {
                try AgentCheck.verify(rootfs: toolchain, agentPath: SandboxConfig().agentPath)
                toolchainDetail = "\(toolchain) (airlock run --image build)"
            } catch {
                toolchainDetail = "\(toolchain) has no usable agent: rebuild it with 'make rootfs-build' (\(error))"
            }
        }
        let kernelSupportsPV = kernel.ok
            && ((try? MappedFile(path: store.kernelPath, role: "kernel")).map(KernelLoader.startsInPVMode) ?? false)
        let mode = profile.guestMode(interfacePresent: interfacePresent && cpuSuits, kernelStartsInPVMode: kernelSupportsPV)
        return HostReport(checks: checks, profile: profile, guestMode: mode,
                          guestModeReason: Self.reason(mode, profile: profile, interfacePresent: interfacePresent,
                                                       cpuSuits: cpuSuits, kernelSupportsPV: kernelSupportsPV),
                          images: images, imagesDirectory: store.imagesDirectory, toolchainImage: toolchainDetail)
    }

    /// Why a guest gets `mode`, in words.
    static func reason(_ mode: HostProfile.GuestMode, profile: HostProfile, interfacePresent: Bool, cpuSuits: Bool = true,
                       kernelSupportsPV: Bool) -> String {
        switch mode {
        case .hardware:
            return "hardware virtualization: the guest kernel runs at ring 0 as on any KVM host"
        case .pvmNative where profile.pv == .kernel:
            return "AIRLOCK_PV=kernel: the VMM registers no VIF page; the guest kernel finds the paravirtual interface itself and runs natively from early in its boot"
        case .pvmNative:
            return "kvm_pvm's paravirtual interface answers (MSR 0x4b564d11 reads \"PVM\") and the kernel carries Airlock's PV note: the VMM registers the guest's VIF page before its first instruction and the guest kernel runs natively"
        case .pvmEmulated:
            if profile.pv == .off { return "forced by AIRLOCK_PV=off: the guest kernel runs in KVM's instruction emulator" }
            if !interfacePresent { return "kvm_pvm without the paravirtual interface (MSR 0x4b564d11 does not read \"PVM\"): the guest kernel runs in KVM's instruction emulator" }
            if !cpuSuits { return "the CPU has no FSGSBASE, which the guest kernel's PV mode needs: the guest kernel runs in KVM's instruction emulator" }
            if !kernelSupportsPV { return "the installed kernel has no Airlock PV note (rebuild it with make images): the guest kernel runs in KVM's instruction emulator" }
            return "the guest kernel runs in KVM's instruction emulator"
        }
    }

    public var text: String {
        var lines: [String] = []
        for c in checks { lines.append("\(c.ok ? "ok  " : "FAIL") \(c.name): \(c.detail)") }
        lines.append("     backend: \(profile.backend.rawValue)")
        lines.append("     guest mode: \(guestMode.rawValue) (\(guestModeReason))")
        let parameters = HostProfile.commandLineParameters(for: guestMode)
        if !parameters.isEmpty {
            lines.append("     kernel command line += \(parameters.joined(separator: " "))")
        }
        if HostProfile.emulationAssists(for: guestMode) {
            lines.append("     the VMM completes int3, fwait and XSAVE/XRSTOR for the emulated guest kernel")
        }
        lines.append("     images in \(imagesDirectory):")
        if images.isEmpty { lines.append("       (none: run 'make images')") }
        for i in images {
            lines.append("       \(i.name)  \(i.size) bytes  sha256 \(i.sha256)")
        }
        if !toolchainImage.isEmpty { lines.append("     toolchain image: \(toolchainImage)") }
        return lines.joined(separator: "\n")
    }
}
