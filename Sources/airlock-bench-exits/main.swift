// The cost of one port-I/O exit through Airlock's run loop.
//
// Runs the same guest loop as ../shared/kvm-probes/micro.c's "100k out" case
// (mov rcx, N; L: out 0x80, al; dec rcx; jnz L) on a machine built the way
// Airlock builds every machine, then ends it with an i8042 reset. Prints one
// line the benchmark script compares with the C floor measured in the same run.
import VirtioDevices
import AirlockOS
#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import VMM

let arguments = CommandLine.arguments
let exits = arguments.count > 1 ? Int(arguments[1]) ?? 100_000 : 100_000
let rounds = arguments.count > 2 ? Int(arguments[2]) ?? 5 : 5

func payload(_ n: Int) -> [UInt8] {
    let n32 = UInt32(n)
    return [0x48, 0xC7, 0xC1,                               // mov rcx, imm32
            UInt8(n32 & 0xFF), UInt8((n32 >> 8) & 0xFF), UInt8((n32 >> 16) & 0xFF), UInt8(n32 >> 24),
            0xE6, 0x80,                                     // L: out 0x80, al
            0x48, 0xFF, 0xC9,                               // dec rcx
            0x75, 0xF9,                                     // jnz L
            0xB0, 0xFE, 0xE6, 0x64,                         // mov al, 0xFE; out 0x64, al
            0xF4]                                           // hlt
}

var samples: [Double] = []
var startups: [Double] = []
for _ in 0..<rounds {
    var config = MachineConfig()
    config.memoryBytes = 64 << 20
    config.console = BoundedCapture(limit: 0)
    do {
        let machine = try Machine(config)
        try machine.loadPayload(payload(exits), at: GuestAddress(0x10_0000))
        let result = try machine.run(timeout: 300)
        guard result.event?.cause == .i8042Reset else {
            print("unexpected end: \(String(describing: result.event)) timedOut=\(result.timedOut)")
            exit(1)
        }
        let seconds = Double(result.timings.stopped - result.timings.firstRun) / 1e9
        samples.append(seconds)
        startups.append(Double(result.timings.firstRun - result.timings.created) / 1e6)
    } catch {
        print("airlock-bench-exits: \(error)")
        exit(1)
    }
}
samples.sort()
let median = samples[samples.count / 2]
print("airlock \(exits) out exits: median \(format3(median)) s (min \(format3(samples.first!)), max \(format3(samples.last!))) = \(format3(median / Double(exits) * 1e6)) us/exit")

startups.sort()
print("machine creation to first KVM_RUN (64 MiB, payload machine): median \(format3(startups[startups.count / 2])) ms (min \(format3(startups.first!)), max \(format3(startups.last!)))")

func format3(_ v: Double) -> String {
    let scaled = (v * 10000).rounded() / 10000
    return "\(scaled)"
}
