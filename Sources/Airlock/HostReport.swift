import AirlockOS
import KVM
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
    public let images: [ImageStore.Image]
    public let imagesDirectory: String
    /// The toolchain image (`--image build`): where it is, or how to build it.
    public var toolchainImage: String = ""

    public var allOK: Bool { checks.allSatisfy(\.ok) }

    public static func gather(kvmPath: String = KVMSystem.defaultPath, store: ImageStore = ImageStore()) -> HostReport {
        var checks: [Check] = []
        let profile = HostProfile.detect()
        do {
            let kvm = try KVMSystem(path: kvmPath)
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
        checks.append(image("guest kernel", store.kernelPath, option: "--kernel"))
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
        return HostReport(checks: checks, profile: profile, images: images, imagesDirectory: store.imagesDirectory,
                          toolchainImage: toolchainDetail)
    }

    public var text: String {
        var lines: [String] = []
        for c in checks { lines.append("\(c.ok ? "ok  " : "FAIL") \(c.name): \(c.detail)") }
        lines.append("     backend: \(profile.backend.rawValue)")
        if profile.backend == .pvm {
            lines.append("     host profile: kernel command line += \(profile.commandLineParameters.joined(separator: " ")); the VMM completes int3, fwait, xsave and xrstor for the emulated guest kernel")
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
