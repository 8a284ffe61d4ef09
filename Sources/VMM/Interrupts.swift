/// One interrupt input of the guest's interrupt controller, as a device sees it.
///
/// Devices model level-triggered lines: they raise the line while an interrupt
/// is pending and lower it when it is not. How that reaches the guest (KVM_IRQ_LINE
/// on the in-kernel irqchip, a test recorder) is the implementation's business.
public protocol InterruptLine: Sendable {
    func setLevel(_ high: Bool)
}
