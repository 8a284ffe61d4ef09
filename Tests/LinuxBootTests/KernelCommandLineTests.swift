import Testing
@testable import LinuxBoot

@Suite struct KernelCommandLineTests {
    @Test func appendsJoinWithOneSpace() throws {
        var c = try KernelCommandLine("console=ttyS0")
        try c.append("  reboot=k\tpanic=-1 \n")
        try c.append("")
        try c.append(" \t ")
        try c.append(key: "root", value: "/dev/vda")
        #expect(c.string == "console=ttyS0 reboot=k\tpanic=-1 root=/dev/vda")
        #expect(c.parameters == ["console=ttyS0", "reboot=k", "panic=-1", "root=/dev/vda"])
        #expect(c.bytesWithNUL == Array(c.string.utf8) + [0])
        #expect(c.contains(key: "console") && c.contains(key: "panic") && c.contains(key: "root"))
        #expect(!c.contains(key: "pani") && !c.contains(key: "ttyS0") && !c.contains(key: "console=ttyS0"))
    }

    @Test func anEmptyLineIsJustTheNUL() throws {
        let c = try KernelCommandLine()
        #expect(c.string.isEmpty && c.bytesWithNUL == [0] && c.parameters.isEmpty)
    }

    @Test func bareFlagsCount() throws {
        let c = try KernelCommandLine("ro noxsave quiet")
        #expect(c.contains(key: "noxsave") && c.contains(key: "ro") && !c.contains(key: "rw"))
    }

    @Test func valuesWithWhitespaceAreQuoted() throws {
        var c = try KernelCommandLine("console=ttyS0")
        try c.append(key: "airlock.msg", value: "hello world")
        try c.append(key: "airlock.tab", value: "a\tb")
        try c.append(key: "empty", value: "")
        #expect(c.string == "console=ttyS0 airlock.msg=\"hello world\" airlock.tab=\"a\tb\" empty=")
        #expect(c.parameters == ["console=ttyS0", "airlock.msg=\"hello world\"", "airlock.tab=\"a\tb\"", "empty="])
        #expect(c.contains(key: "airlock.msg") && c.contains(key: "empty"))
    }

    /// A key that only appears inside a quoted value is not a parameter.
    @Test func containsFollowsTheKernelsSplitting() throws {
        var c = try KernelCommandLine()
        try c.append(key: "init.args", value: "console=hvc0 x")
        #expect(!c.contains(key: "console"))
        try c.append("\"quoted=1\"")  // the kernel accepts a whole parameter in quotes
        #expect(c.contains(key: "quoted"))
    }

    @Test func badKeysAndValuesAreRejected() throws {
        var c = try KernelCommandLine("a=1")
        for key in ["bad key", "k=v", "", "tab\tkey", "q\"k"] {
            #expect(throws: LinuxBootError.self) { try c.append(key: key, value: "x") }
        }
        #expect(throws: LinuxBootError.commandLineInvalid(
            parameter: "k=a\"b", reason: "has a double quote in its value, which the kernel cannot escape: remove it")) {
            try c.append(key: "k", value: "a\"b")
        }
        #expect(c.string == "a=1")
    }

    @Test func nulBytesAreRejectedEverywhere() throws {
        var c = try KernelCommandLine("a=1")
        #expect(throws: LinuxBootError.self) { try c.append("x\u{0}y") }
        #expect(throws: LinuxBootError.self) { try c.append(key: "k", value: "x\u{0}") }
        #expect(throws: LinuxBootError.self) { try c.append(key: "k\u{0}", value: "x") }
        #expect(throws: LinuxBootError.self) { try KernelCommandLine("init=/bin/sh\u{0}") }
        #expect(c.string == "a=1")
        do {
            try c.append("x\u{0}y")
        } catch {
            #expect(error.description.contains("x\\u{0}y") && error.description.contains("NUL"))
        }
    }

    @Test func unbalancedQuotesAreRejected() throws {
        var c = try KernelCommandLine()
        #expect(throws: LinuxBootError.self) { try c.append("a=\"b c") }
        try c.append("a=\"b c\"")
        #expect(c.parameters == ["a=\"b c\""])
    }

    /// COMMAND_LINE_SIZE is 2048 with the NUL: 2047 characters fit, 2048 do not.
    @Test func capacityIsExactIncludingTheNUL() throws {
        var c = try KernelCommandLine()
        try c.append(String(repeating: "a", count: 2047))
        #expect(c.bytesWithNUL.count == 2048)
        var d = try KernelCommandLine()
        #expect(throws: LinuxBootError.commandLineTooLong(length: 2048, capacity: 2048)) {
            try d.append(String(repeating: "a", count: 2048))
        }
        #expect(throws: LinuxBootError.commandLineTooLong(length: 2048, capacity: 2048)) {
            try KernelCommandLine(String(repeating: "a", count: 2048))
        }
        // With a joining space: 2040 + 1 + 6 = 2047 fits, one more byte does not, and a refusal changes nothing.
        var e = try KernelCommandLine(String(repeating: "b", count: 2040))
        #expect(throws: LinuxBootError.commandLineTooLong(length: 2048, capacity: 2048)) { try e.append("1234567") }
        #expect(e.string.utf8.count == 2040)
        try e.append("123456")
        #expect(e.bytesWithNUL.count == 2048)
    }

    @Test func theLimitCountsBytesNotCharacters() throws {
        var c = try KernelCommandLine(capacity: 8)
        try c.append("é=ü")  // 5 bytes
        #expect(throws: LinuxBootError.commandLineTooLong(length: 8, capacity: 8)) { try c.append("é") }  // 5 + 1 + 2
        try c.append("x")  // 7 bytes + NUL = 8
        #expect(c.string == "é=ü x")
    }

    @Test func tooLongMessageNamesTheLengthAndTheLimit() throws {
        var c = try KernelCommandLine()
        do {
            try c.append(String(repeating: "z", count: 3000))
            Issue.record("accepted 3000 bytes")
        } catch {
            #expect(error.description.contains("3000") && error.description.contains("2047") && error.description.contains("2048"))
        }
    }
}
