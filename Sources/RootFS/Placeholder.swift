// Placeholder until the ext4 reader lands.
enum RootFSPlaceholder {}
