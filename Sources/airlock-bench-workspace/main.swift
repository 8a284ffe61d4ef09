// The workspace benchmark's Airlock side (bench/bench.py, section "workspace"):
//
//   airlock-bench-workspace build DIR IMAGE [FREE_BYTES]   a workspace image from DIR, as `airlock run --workspace` makes it
//   airlock-bench-workspace extract IMAGE GUESTDIR OUT      the artifacts under GUESTDIR of IMAGE into OUT, as `--output` does
//
// Each prints one JSON object: the step's own time in ms (what `airlock run`
// reports as timings.workspaceMs and timings.artifactsMs) and what it made.
// The harness times `cp -a` of the same tree beside it.

import WorkspaceDisks
#if canImport(Glibc)
import Glibc
#endif

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) * 1e3 + Double(ts.tv_nsec) / 1e6
}

func fail(_ message: String) -> Never {
    let line = Array("airlock-bench-workspace: \(message)\n".utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(1)
}

let args = Array(CommandLine.arguments.dropFirst())
switch args.first {
case "build" where args.count >= 3:
    let free = args.count > 3 ? UInt64(args[3]) ?? WorkspaceImage.defaultExtraBytes : WorkspaceImage.defaultExtraBytes
    let started = now()
    do {
        let built = try WorkspaceImage.build(from: args[1], extraBytes: free, into: args[2])
        print("{\"ms\": \(now() - started), \"entries\": \(built.entries), \"contentBytes\": \(built.contentBytes), \"imageBytes\": \(built.bytes)}")
    } catch {
        fail("\(error)")
    }
case "extract" where args.count == 4:
    let started = now()
    do {
        let report = try ArtifactExtractor.extract(image: args[1], guestDirectory: args[2], into: args[3])
        print("{\"ms\": \(now() - started), \"entries\": \(report.artifacts.count), \"bytes\": \(report.totalBytes)}")
    } catch {
        fail("\(error)")
    }
default:
    fail("usage: airlock-bench-workspace build DIR IMAGE [FREE_BYTES] | extract IMAGE GUESTDIR OUT")
}
