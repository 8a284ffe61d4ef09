import AirlockOS
import GuestMemory
import Synchronization
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// virtio-blk backed by a host file (virtio 1.2 section 5.2).
///
/// Requests are validated whole before any host I/O: the header must be
/// readable and 16 bytes, the status byte the last writable byte, the data
/// length a multiple of 512 and within the disk over the whole chain. Anything
/// else completes with IOERR (or UNSUPP) and touches nothing. A read-only
/// disk's file is opened O_RDONLY, so no request can change it.
public final class BlockDevice: VirtioDevice, @unchecked Sendable {
    // @unchecked: `file` is immutable; the counters are only touched from
    // `process`, which the transport serialises under its lock.
    public static let sectorSize: UInt64 = 512
    public static let queueSize: UInt16 = 256
    /// Largest single data buffer the driver may use (VIRTIO_BLK_F_SIZE_MAX).
    public static let maxSegmentSize: UInt32 = 1 << 20
    /// Most data buffers per request (VIRTIO_BLK_F_SEG_MAX): the queue minus header and status.
    public static let maxSegments: UInt32 = UInt32(queueSize) - 2

    enum Feature {
        static let sizeMax: UInt64 = 1 << 1
        static let segMax: UInt64 = 1 << 2
        static let readOnly: UInt64 = 1 << 5
        static let blockSize: UInt64 = 1 << 6
        static let flush: UInt64 = 1 << 9
    }

    enum RequestType {
        static let read: UInt32 = 0, write: UInt32 = 1, flush: UInt32 = 4, getID: UInt32 = 8
    }

    enum Status {
        static let ok: UInt8 = 0, ioError: UInt8 = 1, unsupported: UInt8 = 2
    }

    public let path: String
    public let readOnly: Bool
    /// Capacity in 512-byte sectors; a partial last sector is not exposed.
    public let sectors: UInt64
    private let file: OwnedFileDescriptor
    private let serial: [UInt8]
    private let counters = Mutex((requests: 0, errors: 0))

    public convenience init(path: String, readOnly: Bool, serial: String = "airlock") throws(FileAccessError) {
        let file: OwnedFileDescriptor
        do { file = try OwnedFileDescriptor.open(path, flags: readOnly ? O_RDONLY : O_RDWR) } catch {
            throw FileAccessError(path: path, role: "disk image", underlying: error)
        }
        try self.init(descriptor: file, path: path, readOnly: readOnly, serial: serial)
    }

    /// A disk on a descriptor the caller opened (the supervisor, for a jailed VMM); `path`
    /// names it in messages. A read-only disk's descriptor should be O_RDONLY: then no
    /// request can change the file, whatever this device does.
    public init(descriptor file: OwnedFileDescriptor, path: String, readOnly: Bool, serial: String = "airlock") throws(FileAccessError) {
        self.path = path
        self.readOnly = readOnly
        self.file = file
        do throws(SystemError) {
            var info = stat()
            _ = try retryingSyscall("fstat", subject: path) { fstat(file.rawValue, &info) }
            guard (info.st_mode & S_IFMT) == S_IFREG else { throw SystemError("open", subject: path, errno: ENODEV) }
            sectors = UInt64(info.st_size) / Self.sectorSize
        } catch {
            throw FileAccessError(path: path, role: "disk image", underlying: error)
        }
        self.serial = Array(serial.utf8.prefix(20))
    }

    public var deviceID: UInt32 { VirtioDeviceID.block }
    public var queueMaxSizes: [UInt16] { [Self.queueSize] }
    public var offeredFeatures: UInt64 {
        VirtioFeature.version1 | Feature.sizeMax | Feature.segMax | Feature.blockSize | Feature.flush
            | (readOnly ? Feature.readOnly : 0)
    }

    /// Requests served and requests that ended in an error, for tests and diagnostics.
    public var statistics: (requests: Int, errors: Int) { counters.withLock { $0 } }

    func restoreCounters(requests: Int, errors: Int) { counters.withLock { $0 = (requests, errors) } }

    public func readConfig(offset: Int, size: Int) -> UInt64 {
        // struct virtio_blk_config: capacity (le64) at 0, size_max at 8, seg_max at 12,
        // geometry at 16, blk_size at 20.
        var config = [UInt8](repeating: 0, count: 24)
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
            for i in 0..<MemoryLayout<T>.size { config[at + i] = UInt8(truncatingIfNeeded: v >> T(8 * i)) }
        }
        put(sectors, 0)
        put(Self.maxSegmentSize, 8)
        put(Self.maxSegments, 12)
        put(UInt32(Self.sectorSize), 20)
        guard offset >= 0, offset < config.count else { return 0 }
        var v: UInt64 = 0
        for i in 0..<size where offset + i < config.count { v |= UInt64(config[offset + i]) << UInt64(8 * i) }
        return v
    }

    public func writeConfig(offset: Int, size: Int, value: UInt64) {}  // the configuration is read-only
    public func activate(features: UInt64) {}
    public func reset() {}

    public func process(queue index: Int, queues: inout [SplitQueue], memory: GuestMemory) -> QueueProcessing {
        queues[index].drain(memory: memory) { chain in serve(chain, memory: memory) }
    }

    /// Serves one request; returns the bytes written into the chain (data + status).
    func serve(_ chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        counters.withLock { $0.requests += 1 }
        // The status byte is the last byte of the last writable buffer.
        guard let statusBuffer = chain.writable.last, statusBuffer.length >= 1 else {
            counters.withLock { $0.errors += 1 }
            return 0  // nowhere to report: return it unused
        }
        let statusAddress = GuestAddress(statusBuffer.address.raw + UInt64(statusBuffer.length) - 1)
        let (status, written) = execute(chain, memory: memory)
        if status != Status.ok { counters.withLock { $0.errors += 1 } }
        do { try memory.write(status, at: statusAddress) } catch { return 0 }
        return written + 1
    }

    /// The data buffers of a chain, without the header (first readable 16 bytes) and the status byte.
    struct Layout {
        var type: UInt32 = 0
        var sector: UInt64 = 0
        var data: [Descriptor] = []
    }

    func parse(_ chain: DescriptorChain, memory: GuestMemory) -> Layout? {
        // The header must be exactly the first readable buffer (Linux sends it alone).
        guard let header = chain.readable.first, header.length == 16 else { return nil }
        var layout = Layout()
        do {
            layout.type = try memory.read(UInt32.self, at: header.address)
            layout.sector = try memory.read(UInt64.self, at: GuestAddress(header.address.raw + 8))
        } catch { return nil }
        var data = Array(chain.readable.dropFirst())
        var writable = chain.writable
        // The last writable byte is the status; a status-only buffer is dropped,
        // a longer one gives up its last byte.
        if let last = writable.popLast(), last.length > 1 {
            writable.append(Descriptor(address: last.address, length: last.length - 1, isWritable: true))
        }
        data += writable
        layout.data = data
        return layout
    }

    func execute(_ chain: DescriptorChain, memory: GuestMemory) -> (status: UInt8, written: UInt32) {
        guard let request = parse(chain, memory: memory) else { return (Status.ioError, 0) }
        switch request.type {
        case RequestType.read, RequestType.write:
            let isRead = request.type == RequestType.read
            // Reads fill writable buffers, writes drain readable ones; no mixing.
            guard request.data.allSatisfy({ $0.isWritable == isRead }),
                  request.data.count <= Int(Self.maxSegments),
                  request.data.allSatisfy({ $0.length <= Self.maxSegmentSize }) else { return (Status.ioError, 0) }
            if !isRead && readOnly { return (Status.ioError, 0) }
            let total = request.data.reduce(UInt64(0)) { $0 + UInt64($1.length) }
            // Within the disk over the whole chain: sector*512 + total <= capacity*512, checked.
            let (start, o1) = request.sector.multipliedReportingOverflow(by: Self.sectorSize)
            let (end, o2) = start.addingReportingOverflow(total)
            guard !o1, !o2, total % Self.sectorSize == 0, end <= sectors * Self.sectorSize else { return (Status.ioError, 0) }
            var offset = start
            for d in request.data {
                let ok: Bool = (try? memory.withMutableBytes(at: d.address, length: UInt64(d.length)) { buffer -> Bool in
                    isRead ? self.readFully(buffer, at: offset) : self.writeFully(UnsafeRawBufferPointer(buffer), at: offset)
                }) ?? false
                guard ok else { return (Status.ioError, 0) }
                offset += UInt64(d.length)
            }
            return (Status.ok, isRead ? UInt32(truncatingIfNeeded: total) : 0)
        case RequestType.flush:
            if readOnly { return (Status.ok, 0) }
            let rc = retryFsync()
            return (rc ? Status.ok : Status.ioError, 0)
        case RequestType.getID:
            guard let buffer = request.data.first, request.data.count == 1, buffer.isWritable else { return (Status.ioError, 0) }
            // Up to 20 bytes, NUL-padded when shorter.
            var id = serial + [UInt8](repeating: 0, count: max(0, 20 - serial.count))
            id = Array(id.prefix(Int(min(UInt32(20), buffer.length))))
            do { try memory.write(id, at: buffer.address) } catch { return (Status.ioError, 0) }
            return (Status.ok, UInt32(id.count))
        default:
            return (Status.unsupported, 0)
        }
    }

    private func readFully(_ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = pread(file.rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 { if errno == EINTR { continue }; return false }
            if n == 0 {
                // Past the end of a file that shrank: the guest sees zeros, not stale bytes.
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return true
            }
            done += n
        }
        return true
    }

    private func writeFully(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = pwrite(file.rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 { if errno == EINTR { continue }; return false }
            done += n
        }
        return true
    }

    private func retryFsync() -> Bool {
        while fsync(file.rawValue) != 0 { if errno != EINTR { return false } }
        return true
    }
}

/// What a block device holds beyond its file, for snapshots: its geometry
/// (checked against the disk a restored VM gets) and its counters.
public struct BlockDeviceState: Equatable, Sendable {
    public var sectors: UInt64
    public var readOnly: Bool
    public var requests: Int
    public var errors: Int
    public init(sectors: UInt64, readOnly: Bool, requests: Int, errors: Int) {
        self.sectors = sectors; self.readOnly = readOnly; self.requests = requests; self.errors = errors
    }
}

extension BlockDevice {
    public func captureState() -> BlockDeviceState {
        let c = statistics
        return BlockDeviceState(sectors: sectors, readOnly: readOnly, requests: c.requests, errors: c.errors)
    }

    /// Takes over a saved state: the guest's driver knows the disk's size and
    /// whether it may write, so the disk behind this device must agree.
    public func restoreState(_ s: BlockDeviceState, name: String) throws(StateError) {
        guard s.sectors == sectors else {
            throw StateError("\(name): the snapshot's disk had \(s.sectors) sectors, \(path) has \(sectors): restore with the disk the snapshot was made with")
        }
        guard s.readOnly == readOnly else {
            throw StateError("\(name): the snapshot's disk was \(s.readOnly ? "read-only" : "writable"), \(path) is attached \(readOnly ? "read-only" : "writable")")
        }
        guard s.requests >= 0, s.errors >= 0 else { throw StateError("\(name): negative request counters") }
        restoreCounters(requests: s.requests, errors: s.errors)
    }
}
