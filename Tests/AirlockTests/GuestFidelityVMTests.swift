import Foundation
import Testing
import VMM
@testable import Airlock

/// A static guest program from Tests/guest-programs, built with gcc for the guest (no libc, so
/// it runs in any image) and handed to it on stdin.
enum GuestProgram {
    /// `libc`: link glibc statically (gcc -static) for the programs that use it.
    static func build(_ name: String, libc: Bool = false) throws -> [UInt8] {
        let source = VMTests.repositoryRoot.appendingPathComponent("Tests/guest-programs/\(name).c").path
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-\(name)-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: out) }
        let gcc = Process()
        gcc.executableURL = URL(fileURLWithPath: "/usr/bin/gcc")
        gcc.arguments = libc ? ["-O2", "-Wall", "-static", "-o", out, source]
                             : ["-O2", "-Wall", "-static", "-nostdlib", "-fno-stack-protector", "-fno-builtin", "-o", out, source]
        try gcc.run()
        gcc.waitUntilExit()
        guard gcc.terminationStatus == 0 else { throw TestFailure("gcc could not build \(source) (install gcc: make deps)") }
        return Array(try Data(contentsOf: URL(fileURLWithPath: out)))
    }

    /// `sh -c` that stores stdin as /tmp/NAME and runs it with `arguments` (the file stays for later runs).
    static func installAndRun(_ name: String, _ arguments: String) -> [String] {
        ["sh", "-c", "cat > /tmp/\(name) && chmod +x /tmp/\(name) && exec /tmp/\(name) \(arguments)"]
    }

    /// The key=value pairs of a program's summary line.
    static func fields(_ line: String) -> [String: String] {
        var f: [String: String] = [:]
        for part in line.split(whereSeparator: { $0 == " " || $0 == "\n" }) where part.contains("=") {
            let kv = part.split(separator: "=", maxSplits: 1)
            f[String(kv[0])] = kv.count > 1 ? String(kv[1]) : ""
        }
        return f
    }
}

/// Guest CPU fidelity (issue 11): every guest process keeps its own vector registers, and
/// real programs that lean on them (glibc's string functions in busybox) get the right bytes.
/// One VM for all of it: on a PVM host each boot and each emulated-kernel megabyte costs
/// tens of seconds.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct GuestFidelityVMTests {
    /// Whether the guest kernel runs in KVM's instruction emulator here (a PVM host): then
    /// every megabyte through the guest kernel costs about a minute, and the large cases
    /// shrink (and say so) instead of taking an hour.
    /// (In PV mode, issue 12, it runs natively, and this host gives that to the installed kernel.)
    static var emulatedKernel: Bool { PVNativeVMTests.expectedMode() == .pvmEmulated }

    @Test(.timeLimit(.minutes(30)))
    func vectorRegistersStayPerProcessAndRealProgramsGetTheirBytes() async throws {
        let sandbox = try await Sandbox.boot(SandboxConfig(memoryMiB: 256))

        // Four processes with their own values in every enabled vector register (zmm0-31
        // and k0-7 where AVX-512 is on) across yields and timer preemptions. A native kernel
        // (PV mode) yields without switching more often, and a busy host delivers fewer
        // ticks to a spinning vCPU: more of both there (cheap when the kernel is native).
        let (yields, spinMs) = Self.emulatedKernel ? (60, 60) : (400, 150)
        var stress = Command(GuestProgram.installAndRun("vecstress", "--procs 4 --rounds 40 --yields \(yields) --spin-ms \(spinMs) --min-timer 1000"))
        stress.stdin = .bytes(try GuestProgram.build("vecstress"))
        let s = try await sandbox.run(stress)
        let f = GuestProgram.fields(s.stdoutText)
        #expect(s.exitCode == 0, "vecstress: \(s.stdoutText) \(s.stderrText)")
        #expect(f["changed"] == "0" && f["died"] == "0", "\(s.stdoutText)")
        #expect(f["unenabled_state_usable"] == "no", "state the kernel does not enable must fault: \(s.stdoutText)")
        // Timer preemptions follow the ticks a busy host delivers to a spinning vCPU (316 beside
        // the whole suite's VMs, over 1,600 on a quiet host in 40 rounds), so vecstress goes on
        // until it has 1,000 of them, up to eight times its rounds.
        #expect(Int(f["yield_switches"] ?? "") ?? 0 >= 1000 && Int(f["timer_switches"] ?? "") ?? 0 >= 1000, "\(s.stdoutText)")
        // The CPU's whole register file is under test, not a subset the kernel happens to enable.
        if f["cpuid7.ebx"].flatMap({ UInt32($0.dropFirst(2), radix: 16) }).map({ $0 & (1 << 16) != 0 }) == true {
            #expect(f["regs"] == "zmm0-31,k0-7", "AVX-512 is in CPUID, so zmm and k registers must be enabled and kept: \(s.stdoutText)")
        }

        // What else CPUID promises user code holds; what it does not promise is documented
        // (docs/architecture.md, "Guest CPU fidelity").
        let a = try await sandbox.run(Command(["/tmp/vecstress", "--audit"]))
        let audit = GuestProgram.fields(a.stdoutText)
        #expect(a.exitCode == 0, "\(a.stdoutText) \(a.stderrText)")
        if audit["rdrand_ok"] != nil { #expect(audit["rdrand_ok"] == "1", "\(a.stdoutText)") }
        if audit["rdseed_ok"] != nil { #expect(audit["rdseed_ok"] == "1", "\(a.stdoutText)") }
        if let aux = audit["rdtscp_aux"] { #expect(aux == audit["getcpu"], "RDTSCP's TSC_AUX must name the guest CPU: \(a.stdoutText)") }
        if let pid = audit["rdpid"] { #expect(pid == audit["getcpu"], "RDPID must name the guest CPU: \(a.stdoutText)") }
        #expect(audit["fsgsbase_hwcap2"] == audit["fsgsbase_cpuid"], "FSGSBASE in CPUID must be the kernel's (it switches the bases): \(a.stdoutText)")
        // PKU and AMX execute here but the guest kernel switches neither: that is sound only
        // while CPUID does not offer them (well-behaved programs then never use them).
        #expect(audit["pku_cpuid"] == "0" || audit["ospke"] == "1", "PKU is offered but the guest kernel does not switch PKRU: \(a.stdoutText)")
        #expect(audit["amx_cpuid"] == "0", "AMX is offered but the guest kernel does not switch tile state: \(a.stdoutText)")

        // Real programs: byte counts and bytes through glibc's (busybox's) string functions.
        let mib = 1 << 20
        let sizes = Self.emulatedKernel ? [mib] : [mib, 64 * mib]
        if Self.emulatedKernel {
            print("GuestFidelityVMTests: emulated guest kernel: wc/cat run with 1 MiB only (64 MiB would take about an hour here); the pipeline runs twice instead of 10 times")
        }
        for size in sizes {
            var pattern = [UInt8](repeating: 0, count: size)
            var x: UInt64 = 0x9E37_79B9_7F4A_7C15
            for i in 0..<size { x = x &* 6364136223846793005 &+ 1442695040888963407; pattern[i] = UInt8(truncatingIfNeeded: x >> 33) }
            var wc = Command(["wc", "-c"])
            wc.stdin = .bytes(pattern)
            let counted = try await sandbox.run(wc)
            #expect(counted.exitCode == 0 && counted.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines) == "\(size)",
                    "wc -c of \(size) bytes: \(counted.stdoutText) \(counted.stderrText) \(counted.exitCode)")
            var cat = Command(["cat"])
            cat.stdin = .bytes(pattern)
            cat.maxOutputBytes = size + 1
            let copied = try await sandbox.run(cat)
            #expect(copied.exitCode == 0 && copied.stdout == pattern, "cat of \(size) bytes: \(copied.stdout.count) bytes back, status \(copied.exitCode)")
        }

        // The pipeline from the issue gives the host's answer every time.
        let pipeline = #"seq 1 20000 | awk '{print $1 % 97}' | sort -n | uniq -c | md5sum"#
        let host = Process()
        host.executableURL = URL(fileURLWithPath: "/bin/sh")
        host.arguments = ["-c", pipeline]
        let pipe = Pipe()
        host.standardOutput = pipe
        try host.run()
        let expected = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        host.waitUntilExit()
        for round in 1...(Self.emulatedKernel ? 2 : 10) {
            let r = try await sandbox.run(Command(["sh", "-c", pipeline]))
            #expect(r.exitCode == 0 && r.stdoutText == expected && r.stderrText.isEmpty,
                    "round \(round): \(r.stdoutText) \(r.stderrText) (host: \(expected))")
        }
        await sandbox.shutdown()
    }
}
