#include "agent_shim.h"
