import KVM

/// The extended-state instructions a PVM host's emulator rejects and Airlock completes:
/// XSAVE, XSAVEOPT and XRSTOR in their 64-bit (REX.W) forms, the ones Linux's context
/// switch and signal frames use.
///
/// Only those encodings are accepted (with any ModRM/SIB addressing form); anything else
/// decodes to nil and stays an emulation failure, so a guest cannot steer the VMM into code
/// paths nobody has tested. (XGETBV, RDPKRU and WRPKRU are rejected by the emulator too, but
/// the guest kernel never runs them: XGETBV1 is masked and this host offers no PKU in CPUID.)
public struct ExtendedStateInstruction: Equatable, Sendable {
    public enum Operation: Equatable, Sendable { case xsave, xsaveopt, xrstor }

    public var operation: Operation
    /// Bytes the instruction occupies, prefixes included: RIP advances by this much.
    public var length: Int
    /// Where the save area is.
    public var memory: MemoryOperand

    /// `[segment: base + index * scale + displacement]` as a 64-bit-mode ModRM/SIB names it.
    public struct MemoryOperand: Equatable, Sendable {
        public enum SegmentBase: Equatable, Sendable { case none, fs, gs }
        /// General-purpose register numbers (0 = RAX ... 15 = R15).
        public var base: Int?
        public var index: Int?
        public var scale: UInt64 = 1
        public var displacement: Int64 = 0
        /// Relative to the next instruction's address.
        public var ripRelative = false
        public var segment: SegmentBase = .none
        /// The 0x67 prefix: the address is computed in 32 bits.
        public var addressSize32 = false

        /// The linear address for `regs` (RIP = this instruction's start) and the FS/GS bases.
        public func linearAddress(regs: Registers, instructionLength: Int, fsBase: UInt64, gsBase: UInt64) -> UInt64 {
            var address = UInt64(bitPattern: displacement)
            if let base { address &+= regs.gpr(base) }
            if let index { address &+= regs.gpr(index) &* scale }
            if ripRelative { address &+= regs.rip &+ UInt64(instructionLength) }
            if addressSize32 { address &= 0xFFFF_FFFF }
            switch segment {
            case .none: break
            case .fs: address &+= fsBase
            case .gs: address &+= gsBase
            }
            return address
        }
    }

    /// Decodes `bytes` (the instruction KVM failed to emulate, up to 15 bytes); nil when it is
    /// not one of the forms above or is cut short.
    public static func decode(_ bytes: [UInt8]) -> ExtendedStateInstruction? {
        var i = 0
        var segment = MemoryOperand.SegmentBase.none
        var addressSize32 = false
        var rex: UInt8 = 0
        // Legacy prefixes. LOCK, REP and operand-size change what these opcodes mean (or make
        // them #UD): such an instruction is not one Airlock completes.
        prefixes: while i < bytes.count {
            switch bytes[i] {
            case 0x26, 0x2E, 0x36, 0x3E: break  // ES/CS/SS/DS overrides: no effect in 64-bit mode
            case 0x64: segment = .fs
            case 0x65: segment = .gs
            case 0x67: addressSize32 = true
            default: break prefixes
            }
            i += 1
        }
        // REX must come last, right before the opcode.
        if i < bytes.count, bytes[i] & 0xF0 == 0x40 { rex = bytes[i]; i += 1 }
        guard i + 1 < bytes.count, bytes[i] == 0x0F else { return nil }
        let opcode = bytes[i + 1]
        i += 2
        guard i < bytes.count else { return nil }
        let modrm = bytes[i]
        guard opcode == 0xAE else { return nil }
        let mod = modrm >> 6, reg = (modrm >> 3) & 7, rm = modrm & 7
        // mod == 3 is the register form (LFENCE/MFENCE/...); only the 64-bit forms (REX.W) are
        // Linux's: the 32-bit forms store a different x87 pointer layout.
        guard mod != 3, rex & 0x08 != 0 else { return nil }
        let op: Operation
        switch reg {
        case 4: op = .xsave
        case 5: op = .xrstor
        case 6: op = .xsaveopt
        default: return nil
        }
        i += 1
        var operand = MemoryOperand(segment: segment, addressSize32: addressSize32)
        let rexB = Int(rex & 1) << 3, rexX = Int((rex >> 1) & 1) << 3
        if rm == 4 {
            guard i < bytes.count else { return nil }
            let sib = bytes[i]
            i += 1
            let scaleBits = sib >> 6, index = Int((sib >> 3) & 7) | rexX, base = Int(sib & 7)
            operand.scale = 1 << UInt64(scaleBits)
            operand.index = index == 4 ? nil : index  // index 100b without REX.X means none
            if base == 5 && mod == 0 {
                operand.base = nil  // disp32 with no base
                guard let d = displacement(bytes, at: &i, size: 4) else { return nil }
                operand.displacement = d
            } else {
                operand.base = base | rexB
            }
        } else if rm == 5 && mod == 0 {
            operand.ripRelative = true
            guard let d = displacement(bytes, at: &i, size: 4) else { return nil }
            operand.displacement = d
        } else {
            operand.base = Int(rm) | rexB
        }
        if mod == 1 {
            guard let d = displacement(bytes, at: &i, size: 1) else { return nil }
            operand.displacement = d
        } else if mod == 2 {
            guard let d = displacement(bytes, at: &i, size: 4) else { return nil }
            operand.displacement = d
        }
        return ExtendedStateInstruction(operation: op, length: i, memory: operand)
    }

    /// A sign-extended little-endian displacement of `size` bytes at `offset`, which it advances.
    private static func displacement(_ bytes: [UInt8], at offset: inout Int, size: Int) -> Int64? {
        guard offset + size <= bytes.count else { return nil }
        var v: UInt64 = 0
        for k in 0..<size { v |= UInt64(bytes[offset + k]) << UInt64(8 * k) }
        offset += size
        let shift = UInt64(64 - 8 * size)
        return Int64(bitPattern: v << shift) >> Int64(shift)
    }
}

extension Registers {
    /// General-purpose register `n` in encoding order (0 = RAX, 1 = RCX, ... 15 = R15).
    public func gpr(_ n: Int) -> UInt64 {
        switch n & 15 {
        case 0: return rax
        case 1: return rcx
        case 2: return rdx
        case 3: return rbx
        case 4: return rsp
        case 5: return rbp
        case 6: return rsi
        case 7: return rdi
        case 8: return r8
        case 9: return r9
        case 10: return r10
        case 11: return r11
        case 12: return r12
        case 13: return r13
        case 14: return r14
        default: return r15
        }
    }
}
