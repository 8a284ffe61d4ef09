// A seeded random driver for the virtio-mmio transport, the split-queue chain
// parser and virtio-blk: millions of register writes, chains and notifications
// with guest-controlled numbers drawn to hit the edges (past RAM, across the
// hole, overflowing, loops, zero and 4 GiB lengths, jumping indices).
//
//   airlock-fuzz-virtio [ITERATIONS] [SEED]
//
// Checks after the run: the process is alive, the read-only disk's backing
// file is byte-for-byte unchanged, a valid request is still served after a
// reset, and resident memory did not grow past a fixed bound. Exit status 1
// on any violation.
import AirlockOS
import GuestMemory
import SeededRandom
import Virtio
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif


final class NullLine: InterruptLine { func setLevel(_ high: Bool) {} }

func residentKiB() -> Int {
    guard let f = fopen("/proc/self/statm", "r") else { return 0 }
    defer { fclose(f) }
    var size = 0, resident = 0
    _ = withUnsafeMutablePointer(to: &size) { s in withUnsafeMutablePointer(to: &resident) { r in
        withVaList([s, r]) { vfscanf(f, "%ld %ld", $0) } } }
    return resident * Int(sysconf(Int32(_SC_PAGESIZE))) / 1024
}

func fail(_ message: String) -> Never {
    print("FAIL: \(message)")
    exit(1)
}

let arguments = CommandLine.arguments
let iterations = arguments.count > 1 ? Int(arguments[1]) ?? 1_000_000 : 1_000_000
let seed = arguments.count > 2 ? UInt64(arguments[2]) ?? 1 : 1
var rng = SplitMix64(seed: seed)

// A 64-sector read-only disk with known contents.
let diskPath = "/tmp/airlock-fuzz-\(getpid()).img"
let diskBytes = (0..<(64 * 512)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
do {
    let fd = try OwnedFileDescriptor.open(diskPath, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o600)
    try diskBytes.withUnsafeBytes { try fd.writeAll($0) }
} catch { fail("cannot create \(diskPath): \(error)") }
defer { unlink(diskPath) }

// RAM: 1 MiB at 0 and 1 MiB at 4 MiB, with a hole between.
let memory = try! GuestMemory(layout: [(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 1 << 20)])
let device = try! BlockDevice(path: diskPath, readOnly: true)
let transport = MMIOTransport(device: device, memory: memory, interrupt: NullLine())
let queueSize: UInt16 = 8
let desc: UInt64 = 0x1000, avail: UInt64 = 0x2000, used: UInt64 = 0x3000

@MainActor func w(_ offset: UInt64, _ value: UInt64, _ size: Int = 4) { transport.write(offset: offset, size: size, value: value) }

@MainActor func bringUp() {
    w(0x70, 0); w(0x70, 1); w(0x70, 3)
    w(0x24, 1); w(0x20, 1)  // VERSION_1
    w(0x24, 0); w(0x20, 0)
    w(0x70, 11)
    w(0x30, 0); w(0x38, UInt64(queueSize))
    w(0x80, desc); w(0x84, 0); w(0x90, avail); w(0x94, 0); w(0xA0, used); w(0xA4, 0)
    w(0x44, 1); w(0x70, 15)
}

/// Addresses chosen to hit edges more often than uniform draws would.
@MainActor func interestingAddress() -> UInt64 {
    switch rng.next() % 10 {
    case 0: return UInt64.max &- rng.next() % 64
    case 1: return (1 << 20) &- rng.next() % 64        // end of the first region
    case 2: return (2 << 20) + rng.next() % (2 << 20)  // in the hole
    case 3: return (5 << 20) &- rng.next() % 64        // end of RAM
    case 4: return rng.next()
    default: return 0x10000 + rng.next() % 0x8000      // valid buffers
    }
}

@MainActor func interestingLength() -> UInt32 {
    switch rng.next() % 8 {
    case 0: return 0
    case 1: return UInt32.max
    case 2: return 16
    case 3: return 1
    case 4: return UInt32(truncatingIfNeeded: rng.next())
    default: return 512 * UInt32(1 + rng.next() % 4)
    }
}

bringUp()
var availIndex: UInt16 = 0
var baseline = 0
let start = monotonicNanoseconds()
for i in 0..<iterations {
    if i == 10_000 { baseline = residentKiB() }
    switch rng.next() % 16 {
    case 0:
        // A random register write at a random width, then (usually) a clean bring-up.
        let offset = rng.next() % 0x120
        let width = [1, 2, 4, 8][Int(rng.next() % 4)]
        w(offset, rng.next(), width)
        _ = transport.read(offset: rng.next() % 0x120, size: width)
        if rng.next() % 4 != 0 { bringUp(); availIndex = 0 }
    case 1:
        // The available index jumps anywhere.
        availIndex = UInt16(truncatingIfNeeded: rng.next())
        try? memory.write(availIndex, at: GuestAddress(avail + 2))
        w(0x50, 0)
        bringUp(); availIndex = 0
    default:
        // A random chain of up to 5 descriptors, sometimes well-formed.
        let count = 1 + Int(rng.next() % 5)
        for d in 0..<count {
            let at = desc + UInt64(d) * 16
            let wellFormed = rng.next() % 3 == 0
            let addr = wellFormed ? (d == 0 ? 0x10000 : 0x11000 + UInt64(d) * 0x1000) : interestingAddress()
            let len = wellFormed ? (d == 0 ? 16 : d == count - 1 ? 1 : 512) : interestingLength()
            var flags = UInt16(truncatingIfNeeded: rng.next() % 8)
            if wellFormed { flags = (d < count - 1 ? 1 : 0) | (d > 0 ? 2 : 0) }
            let next = wellFormed ? UInt16(d + 1) : UInt16(truncatingIfNeeded: rng.next() % 12)
            try? memory.write(addr, at: GuestAddress(at))
            try? memory.write(len, at: GuestAddress(at + 8))
            try? memory.write(flags, at: GuestAddress(at + 12))
            try? memory.write(next, at: GuestAddress(at + 14))
        }
        // A request header: random type and sector, often sane.
        try? memory.write(UInt32(rng.next() % 3 == 0 ? rng.next() % 10 : rng.next() % 2), at: GuestAddress(0x10000))
        try? memory.write(rng.next() % 2 == 0 ? rng.next() % 70 : rng.next(), at: GuestAddress(0x10008))
        let head = rng.next() % 7 == 0 ? UInt16(truncatingIfNeeded: rng.next()) : 0
        try? memory.write(head, at: GuestAddress(avail + 4 + 2 * UInt64(availIndex % queueSize)))
        availIndex &+= 1
        try? memory.write(availIndex, at: GuestAddress(avail + 2))
        w(0x50, 0)
        if transport.status & VirtioStatus.deviceNeedsReset != 0 { bringUp(); availIndex = 0 }
    }
}
let seconds = Double(monotonicNanoseconds() - start) / 1e9
let grown = residentKiB() - baseline

// The read-only disk never changed.
var after = [UInt8](repeating: 0, count: diskBytes.count)
do {
    let fd = try OwnedFileDescriptor.open(diskPath, flags: O_RDONLY)
    _ = try after.withUnsafeMutableBytes { try fd.readExactly(into: $0, at: 0) }
} catch { fail("cannot read back \(diskPath): \(error)") }
if after != diskBytes { fail("the read-only disk's backing file changed") }

// A valid read is still served.
bringUp()
try! memory.write(UInt32(0), at: GuestAddress(0x10000))
try! memory.write(UInt64(5), at: GuestAddress(0x10008))
let chain: [(UInt64, UInt32, UInt16, UInt16)] = [(0x10000, 16, 1, 1), (0x11000, 512, 3, 2), (0x12000, 1, 2, 0)]
for (d, c) in chain.enumerated() {
    let at = desc + UInt64(d) * 16
    try! memory.write(c.0, at: GuestAddress(at)); try! memory.write(c.1, at: GuestAddress(at + 8))
    try! memory.write(c.2, at: GuestAddress(at + 12)); try! memory.write(c.3, at: GuestAddress(at + 14))
}
try! memory.write(UInt16(0), at: GuestAddress(avail + 4))
try! memory.write(UInt16(1), at: GuestAddress(avail + 2))
try! memory.write(UInt8(0xFF), at: GuestAddress(0x12000))
w(0x50, 0)
let status: UInt8 = try! memory.read(at: GuestAddress(0x12000))
let firstByte: UInt8 = try! memory.read(at: GuestAddress(0x11000))
if status != 0 || firstByte != diskBytes[5 * 512] { fail("a valid read after the run returned status \(status)") }

let stats = device.statistics
print("airlock-fuzz-virtio: \(iterations) iterations, seed \(seed), \(String(format2(seconds))) s (\(Int(Double(iterations) / seconds)) per s)")
print("  requests reaching the device: \(stats.requests), failed with IOERR/UNSUPP or unreturnable: \(stats.errors), malformed chains or ring errors: \(transport.queueErrors)")
print("  resident memory growth after warm-up: \(grown) KiB")
if grown > 8 * 1024 { fail("resident memory grew by \(grown) KiB") }
print("PASS")

func format2(_ v: Double) -> String { "\((v * 100).rounded() / 100)" }
