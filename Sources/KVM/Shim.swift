import CAirlockShim

// Thin renames so the rest of the target reads as Swift.
@inline(__always) func airlockIoctlPtr(_ fd: Int32, _ request: UInt, _ arg: UnsafeMutableRawPointer?) -> Int32 {
    airlock_ioctl_ptr(fd, request, arg)
}
@inline(__always) func airlockIoctlVal(_ fd: Int32, _ request: UInt, _ arg: UInt) -> Int32 {
    airlock_ioctl_val(fd, request, arg)
}
