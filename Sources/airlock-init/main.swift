import AgentCore
print("airlock-init")
