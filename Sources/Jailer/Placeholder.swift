// Placeholder until the jailer lands.
enum JailerPlaceholder {}
