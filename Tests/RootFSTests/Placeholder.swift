import Testing
@Test func rootfsPlaceholder() {}
