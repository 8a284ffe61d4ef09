// The guest's PID 1 for `airlock run`: everything is in AgentCore.
import AgentCore

Agent.main()
