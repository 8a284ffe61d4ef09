@testable import Jailer
import Testing

/// Finding the hierarchies and where a VM's group goes, from fixture text.
struct CgroupLayoutTests {
    /// This development machine: v1 hierarchies plus a unified mount with hugetlb only.
    static let hybridMountinfo = """
        22 1 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
        30 22 0:25 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
        31 30 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
        32 30 0:27 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
        34 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
        38 30 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
        40 30 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
        """
    static let hybridSelf = """
        9:name=systemd:/
        8:pids:/
        4:memory:/process_api/abc
        2:cpuacct:/
        1:cpu:/
        0::/
        """

    @Test func v1IsChosenWhenTheUnifiedMountLacksControllers() throws {
        let mounts = Cgroups.mounts(mountinfo: Self.hybridMountinfo)
        #expect(mounts.count == 5)
        let layout = try Cgroups.layout(mounts: mounts) { _ in ["hugetlb"] }
        guard case let .v1(byController) = layout else { Issue.record("expected v1, got \(layout)"); return }
        #expect(byController["memory"]?.mountPoint == "/sys/fs/cgroup/memory")
        #expect(byController["cpu"]?.mountPoint == "/sys/fs/cgroup/cpu")
        // v1 nests under the supervisor's own group in each hierarchy.
        #expect(try Cgroups.parents(layout: layout, procSelfCgroup: Self.hybridSelf, name: "airlock") == [
            "/sys/fs/cgroup/memory/process_api/abc/airlock", "/sys/fs/cgroup/pids/airlock", "/sys/fs/cgroup/cpu/airlock",
        ])
    }

    @Test func v2IsChosenWhenItOffersEveryController() throws {
        let info = "40 30 0:35 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate"
        let layout = try Cgroups.layout(mounts: Cgroups.mounts(mountinfo: info)) { _ in ["cpuset", "cpu", "io", "memory", "pids"] }
        guard case .v2 = layout else { Issue.record("expected v2, got \(layout)"); return }
        // v2 puts the VMs beside the supervisor's group (no processes in inner groups).
        #expect(try Cgroups.parents(layout: layout, procSelfCgroup: "0::/system.slice/airlock.service\n", name: "airlock")
                == ["/sys/fs/cgroup/system.slice/airlock"])
        #expect(try Cgroups.parents(layout: layout, procSelfCgroup: "0::/\n", name: "airlock") == ["/sys/fs/cgroup/airlock"])
    }

    @Test func coMountedControllersShareOneGroup() throws {
        let info = """
            31 30 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
            34 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
            38 30 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
            """
        let layout = try Cgroups.layout(mounts: Cgroups.mounts(mountinfo: info)) { _ in [] }
        let parents = try Cgroups.parents(layout: layout, procSelfCgroup: "3:cpu,cpuacct:/a\n2:memory:/a\n1:pids:/a\n", name: "airlock")
        #expect(parents == ["/sys/fs/cgroup/memory/a/airlock", "/sys/fs/cgroup/pids/a/airlock", "/sys/fs/cgroup/cpu,cpuacct/a/airlock"])
    }

    @Test func aMissingControllerIsNamed() {
        let info = "34 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory"
        do {
            _ = try Cgroups.layout(mounts: Cgroups.mounts(mountinfo: info)) { _ in [] }
            Issue.record("accepted a host without pids and cpu")
        } catch {
            #expect(error.description.contains("pids, cpu"), "\(error)")
        }
    }

    @Test func escapedMountPointsAreDecoded() {
        #expect(Cgroups.unescapeMountField("/a\\040b\\134c") == "/a b\\c")
        #expect(Cgroups.unescapeMountField("/plain") == "/plain")
        #expect(Cgroups.unescapeMountField("/trailing\\04") == "/trailing\\04")
    }

    @Test func theCurrentHostHasAUsableLayout() throws {
        // Reading /proc needs no root; this host must offer the controllers.
        _ = try Cgroups.detect()
    }
}
