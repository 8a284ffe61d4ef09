import Testing
@Test func jailerPlaceholder() {}
