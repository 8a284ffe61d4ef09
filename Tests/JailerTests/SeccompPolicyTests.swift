import CSeccomp
@testable import Jailer
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The policy as data: what a reviewer relies on, checked without root.
struct SeccompPolicyTests {
    @Test(arguments: ThreadRole.allCases)
    func everyEntryHasAReasonAndAKnownName(_ role: ThreadRole) {
        let rules = SeccompPolicy.rules(for: role)
        #expect(!rules.isEmpty)
        for rule in rules {
            #expect(rule.reason.count >= 15, "\(role) \(rule.name): give a real reason")
            #expect(Seccomp.syscallNumber(rule.name) != nil, "\(role) \(rule.name) is not a syscall libseccomp knows")
        }
        let names = rules.map(\.name)
        #expect(Set(names).count == names.count, "\(role) lists a syscall twice: merge the entries")
    }

    @Test(arguments: ThreadRole.allCases)
    func nothingCanMakeExecutableMemory(_ role: ThreadRole) {
        let rules = SeccompPolicy.rules(for: role)
        for name in ["mmap", "mprotect"] {
            if let rule = rules.first(where: { $0.name == name }) {
                #expect(rule.filter == .withoutProtExec, "\(role) \(name) must refuse PROT_EXEC")
            }
        }
        for name in ["pkey_mprotect", "remap_file_pages", "mremap", "memfd_create", "execve", "execveat"] {
            #expect(!rules.contains { $0.name == name }, "\(role) must not allow \(name)")
        }
    }

    @Test(arguments: ThreadRole.allCases)
    func ioctlIsLimitedToKVMRequests(_ role: ThreadRole) throws {
        let ioctl = try #require(SeccompPolicy.rules(for: role).first { $0.name == "ioctl" })
        guard case let .kvmRequests(requests) = ioctl.filter else {
            Issue.record("\(role) ioctl has no request filter")
            return
        }
        #expect(!requests.isEmpty)
        for request in requests {
            // _IOC type field (bits 8-15) is KVMIO, 0xAE, for every KVM request.
            #expect((request.number >> 8) & 0xFF == 0xAE, "\(request) (\(String(request.number, radix: 16))) is not a KVM ioctl")
        }
        for setUp in [KVMRequest.createVM, .createVCPU, .setUserMemoryRegion, .getAPIVersion, .setSregs] {
            #expect(!requests.contains(setUp), "\(role) allows \(setUp.rawValue), which only set-up uses")
        }
    }

    @Test func theVCPURolesRequestsMatchWhatTheExitHandlerUses() {
        #expect(Set(SeccompPolicy.vcpuKVMRequests) == [.run, .getRegs, .setRegs, .getVCPUEvents, .setVCPUEvents, .irqLine,
                                                       .getSregs, .getXSAVE, .getXSAVE2, .setXSAVE, .getXCRS])
        #expect(SeccompPolicy.mainKVMRequests.contains(.irqLine), "host input raises interrupts from non-vCPU threads")
    }

    /// A vCPU thread runs under both filters: whatever its own list allows,
    /// the main list (inherited) must allow too, or the call still fails.
    @Test func theVCPUListFitsInsideTheMainList() throws {
        let main = SeccompPolicy.rules(for: .main)
        for rule in SeccompPolicy.rules(for: .vcpu) {
            let outer = try #require(main.first { $0.name == rule.name }, "vcpu allows \(rule.name) but main (inherited) does not")
            if case let .kvmRequests(inner) = rule.filter, case let .kvmRequests(outerRequests) = outer.filter {
                #expect(Set(inner).isSubset(of: Set(outerRequests)), "vcpu ioctl requests beyond main's")
            } else {
                #expect(rule.filter == outer.filter || outer.filter == .none, "\(rule.name): vcpu's filter is looser than main's")
            }
        }
        #expect(SeccompPolicy.rules(for: .vcpu).count < main.count)
    }

    @Test func noNetworkNoFilesNoNewProcesses() {
        for role in ThreadRole.allCases {
            let names = Set(SeccompPolicy.rules(for: role).map(\.name))
            for forbidden in ["socket", "connect", "open", "openat", "openat2", "creat", "execve", "fork", "vfork",
                              "ptrace", "unshare", "setns", "mount", "kill", "bpf", "perf_event_open", "process_vm_writev"] {
                #expect(!names.contains(forbidden), "\(role) allows \(forbidden)")
            }
        }
        let clone = SeccompPolicy.rules(for: .main).first { $0.name == "clone" }
        #expect(clone?.filter == .cloneThreadOnly, "clone only for threads")
        let clone3 = SeccompPolicy.rules(for: .main).first { $0.name == "clone3" }
        #expect(clone3?.action == .errno(ENOSYS), "clone3 answers ENOSYS so glibc uses the filterable clone")
        let sigaction = SeccompPolicy.rules(for: .main).first { $0.name == "rt_sigaction" }
        #expect(sigaction?.filter == .signalOtherThan(SIGSYS), "the SIGSYS reporter cannot be replaced")
    }

    @Test func theFiltersCompile() throws {
        let programs = try Seccomp.compiledPrograms()
        for role in ThreadRole.allCases {
            let bytes = try #require(programs[role])
            #expect(bytes.count % 8 == 0 && bytes.count / 8 <= 4096, "\(role): \(bytes.count) bytes of BPF")
        }
    }

    @Test func argumentFiltersCompareWhatTheKernelReads() {
        // ioctl requests are unsigned int in the kernel: only the low 32 bits may count.
        let ioctl = Seccomp.argumentConditions(.kvmRequests([.run]))
        #expect(ioctl.count == 1 && ioctl[0].count == 1)
        #expect(ioctl[0][0].arg == 1 && ioctl[0][0].op == SCMP_CMP_MASKED_EQ && ioctl[0][0].datum_a == 0xFFFF_FFFF
                && ioctl[0][0].datum_b == UInt64(KVMRequest.run.number))
        let noExec = Seccomp.argumentConditions(.withoutProtExec)
        #expect(noExec[0][0].arg == 2 && noExec[0][0].datum_a == UInt64(PROT_EXEC) && noExec[0][0].datum_b == 0)
        let seccomp = Seccomp.argumentConditions(.seccompFilterOnly)
        #expect(seccomp[0].count == 2, "operation and flags both pinned")
    }
}
