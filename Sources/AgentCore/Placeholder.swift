import AgentProtocol
public enum AgentCorePlaceholder {}
