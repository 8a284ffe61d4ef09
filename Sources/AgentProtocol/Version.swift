// Host-guest protocol: see Protocol.swift (being written).
public enum AgentProtocolVersion { public static let current: UInt16 = 1 }
