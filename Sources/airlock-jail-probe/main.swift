// airlock-jail-probe: a stand-in for the VMM in JailerTests.
//
// Started by PreparedJail.spawn, it enters the jail from the spec in its
// environment, reports what it sees inside (before the filters), installs the
// main filter, starts a second thread that installs the vCPU filter, and
// prints "ready". Then, as its arguments ask, it makes one forbidden system
// call on the chosen thread (which must end it with exit status 159), makes
// an allowed KVM ioctl, holds until stdin closes, and exits 0.
//
//   airlock-jail-probe [--violate execve|socket|open|ioctl|mmap-exec|fork] [--on main|vcpu]
//                      [--allowed-ioctl] [--hold]
//
// The tests read everything else (status, namespaces, fds) from the host's
// /proc: the filters forbid the probe to open files, which is the point.
// The work happens in Probe.swift, outside main.swift's top-level code, which
// Swift 6 isolates to the main actor: the probe's second thread must not be.
probeMain()
