/// `GET /openapi.json`: the OpenAPI 3.1 description of every route. A test checks it
/// against the router (paths and methods), the request decoder (the fields), and the
/// receipt and events the service writes (their keys).
enum OpenAPIDocument {
    static let json = #"""
    {
      "openapi": "3.1.0",
      "info": {
        "title": "airlock serve",
        "version": "1.0.0",
        "description": "Runs a command in a fresh Airlock micro-VM per request and answers with its output and status. Each sandbox serves exactly one request and is then destroyed. On TCP every route but /v1/health needs the bearer token from --token-file; a Unix socket is guarded by its file mode instead. See docs/serve.md."
      },
      "security": [{"bearerAuth": []}],
      "paths": {
        "/v1/runs": {
          "post": {
            "operationId": "createRun",
            "summary": "Run one command in a fresh sandbox",
            "description": "With Accept: application/x-ndjson the answer streams one event per line as it happens (started, stdout and stderr chunks, then exited or error). Without it, the answer is the receipt, once the VM has ended. A client that disconnects ends its VM.",
            "requestBody": {
              "required": true,
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunRequest"}}}
            },
            "responses": {
              "200": {
                "description": "The command ran (whatever its exit status); the receipt, or the event stream.",
                "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}},
                "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/Receipt"}},
                  "application/x-ndjson": {"schema": {"$ref": "#/components/schemas/RunEvent"}}
                }
              },
              "400": {"$ref": "#/components/responses/BadRequest"},
              "401": {"$ref": "#/components/responses/Unauthorized"},
              "413": {"$ref": "#/components/responses/TooLarge"},
              "429": {"$ref": "#/components/responses/QueueFull"},
              "500": {"$ref": "#/components/responses/AirlockFailed"},
              "503": {"$ref": "#/components/responses/Unavailable"}
            }
          }
        },
        "/v1/health": {
          "get": {
            "operationId": "getHealth",
            "summary": "Whether the service takes requests, and its pool",
            "security": [],
            "responses": {
              "200": {"description": "Serving.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
              "503": {"description": "Draining (shutting down): send requests elsewhere.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}
            }
          }
        },
        "/metrics": {
          "get": {
            "operationId": "getMetrics",
            "summary": "Prometheus text exposition",
            "description": "airlock_serve_runs_total{outcome}, airlock_serve_refusals_total{reason}, airlock_serve_boots_total{result}, airlock_serve_restores_total{result}, airlock_serve_run_duration_seconds and airlock_serve_queue_wait_seconds (histograms), airlock_serve_pool_size_sandboxes, airlock_serve_ready_sandboxes, airlock_serve_busy_sandboxes, airlock_serve_booting_sandboxes.",
            "responses": {
              "200": {"description": "The metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
              "401": {"$ref": "#/components/responses/Unauthorized"}
            }
          }
        },
        "/openapi.json": {
          "get": {
            "operationId": "getOpenAPI",
            "summary": "This document",
            "responses": {
              "200": {"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {"type": "object"}}}},
              "401": {"$ref": "#/components/responses/Unauthorized"}
            }
          }
        }
      },
      "components": {
        "securitySchemes": {
          "bearerAuth": {"type": "http", "scheme": "bearer", "description": "The contents of the service's --token-file."}
        },
        "headers": {
          "RequestId": {"description": "The request's id, as in the service's log line.", "schema": {"type": "string"}},
          "RetryAfter": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer", "minimum": 1}}
        },
        "responses": {
          "BadRequest": {"description": "Malformed JSON, a wrong type, an unknown field or a value out of range; field names it.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
          "Unauthorized": {"description": "No bearer token, or the wrong one.", "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
          "TooLarge": {"description": "The body is over --max-body.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
          "QueueFull": {"description": "--queue requests wait already.", "headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
          "AirlockFailed": {"description": "The run failed inside Airlock (a boot, the VMM, the agent's protocol); error says why.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
          "Unavailable": {"description": "Shutting down, no sandbox within --queue-timeout, or the run was stopped.", "headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        },
        "schemas": {
          "RunRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["argv"],
            "properties": {
              "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "The program and its arguments."},
              "env": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Added to the guest's defaults (PATH, HOME)."},
              "workdir": {"type": "string", "default": "/", "description": "The working directory in the guest; it must exist."},
              "user": {"type": "string", "default": "", "description": "NAME, UID, NAME:GROUP or UID:GID from the guest's /etc/passwd; empty for root."},
              "stdin": {"type": "string", "description": "The command's input, as text."},
              "stdinBase64": {"type": "string", "contentEncoding": "base64", "description": "The command's input, as base64 (not with stdin)."},
              "timeoutSeconds": {"type": "number", "exclusiveMinimum": 0, "description": "From the command's start; then the VM is destroyed (exit code 124). Default and maximum: the service's --timeout and --max-timeout."},
              "maxOutputBytes": {"type": "integer", "minimum": 0, "description": "Per stream; the rest is dropped and outputTruncated set. Default and maximum: --max-output."},
              "memoryMiB": {"type": "integer", "minimum": 32, "multipleOf": 2, "description": "Guest memory; other than the pool's --memory, the request gets a VM booted for it alone. At most --max-memory."}
            }
          },
          "Timings": {
            "type": "object",
            "required": ["vmmStartMs", "kernelBootMs", "restoreMs", "agentReadyMs", "commandMs", "shutdownMs", "totalMs", "workspaceMs", "artifactsMs"],
            "properties": {
              "workspaceMs": {"type": "number", "description": "Always 0 here: the service takes no workspace (airlock run --workspace)."},
              "artifactsMs": {"type": "number", "description": "Always 0 here: nothing is copied back (airlock run --output)."},
              "vmmStartMs": {"type": "number"},
              "kernelBootMs": {"type": "number"},
              "restoreMs": {"type": "number", "description": "The VMM's restore of this sandbox from its snapshot; 0 when it booted (airlock serve --no-snapshot, or other memoryMiB than the pool's)."},
              "agentReadyMs": {"type": "number"},
              "commandMs": {"type": "number"},
              "shutdownMs": {"type": "number"},
              "totalMs": {"type": "number"}
            }
          },
          "Receipt": {
            "type": "object",
            "description": "The document of airlock run --json (docs/run.md), plus id, fromPool, queueMs and sandboxMs.",
            "required": ["stdout", "stderr", "stdoutBase64", "stderrBase64", "exitCode", "signal", "timedOut", "outputTruncated", "stdoutDroppedBytes", "stderrDroppedBytes", "failure", "systemEvent", "guestMode", "artifacts", "artifactsError", "snapshot", "timings", "id", "fromPool", "queueMs", "sandboxMs"],
            "properties": {
              "stdout": {"type": "string"},
              "stderr": {"type": "string"},
              "stdoutBase64": {"type": ["string", "null"], "description": "The exact bytes when stdout is not valid UTF-8."},
              "stderrBase64": {"type": ["string", "null"]},
              "exitCode": {"type": "integer"},
              "signal": {"type": ["integer", "null"]},
              "timedOut": {"type": "boolean"},
              "outputTruncated": {"type": "boolean"},
              "stdoutDroppedBytes": {"type": "integer", "minimum": 0, "description": "Bytes of stdout dropped past maxOutputBytes."},
              "stderrDroppedBytes": {"type": "integer", "minimum": 0},
              "failure": {"type": ["string", "null"], "description": "Why the command did not run (not found, unknown user, ...)."},
              "systemEvent": {"type": ["string", "null"]},
              "guestMode": {"enum": ["hardware", "pvm-emulated", "pvm-native", null], "description": "How the guest kernel ran: hardware virtualization, or on a PVM host in KVM's emulator or natively (airlock doctor says why)."},
              "artifacts": {"type": "null", "description": "Always null here: the service takes no workspace, so nothing comes back (airlock run --output)."},
              "artifactsError": {"type": "null"},
              "snapshot": {"type": ["object", "null"], "description": "The snapshot this sandbox was restored from (path, restored, restoreMs, checkMs, allocatedBytes, saveMs, writeMs, as in airlock run --json); null when it booted."},
              "timings": {"$ref": "#/components/schemas/Timings"},
              "id": {"type": "string"},
              "fromPool": {"type": "boolean", "description": "The sandbox was ready before the request arrived (no boot on its path)."},
              "queueMs": {"type": "number", "description": "Waiting for a sandbox: a free slot, then a ready VM."},
              "sandboxMs": {"type": "number", "description": "From handing the sandbox the command to the VM's end."}
            }
          },
          "StartedEvent": {
            "type": "object",
            "required": ["event", "id", "fromPool", "queueMs"],
            "properties": {
              "event": {"const": "started"},
              "id": {"type": "string"},
              "fromPool": {"type": "boolean"},
              "queueMs": {"type": "number"}
            }
          },
          "OutputEvent": {
            "type": "object",
            "required": ["event", "text", "base64"],
            "properties": {
              "event": {"enum": ["stdout", "stderr"]},
              "text": {"type": "string", "description": "The chunk as UTF-8 (cut only between characters)."},
              "base64": {"type": ["string", "null"], "description": "The exact bytes when they are not valid UTF-8."}
            }
          },
          "ExitedEvent": {
            "allOf": [
              {"$ref": "#/components/schemas/Receipt"},
              {"type": "object", "required": ["event"], "properties": {"event": {"const": "exited"}}}
            ]
          },
          "ErrorEvent": {
            "type": "object",
            "required": ["event", "status", "error", "id"],
            "properties": {
              "event": {"const": "error"},
              "status": {"type": "integer", "description": "The status a non-streaming answer would have had."},
              "error": {"type": "string"},
              "id": {"type": "string"}
            }
          },
          "RunEvent": {
            "description": "One line of an application/x-ndjson answer.",
            "oneOf": [
              {"$ref": "#/components/schemas/StartedEvent"},
              {"$ref": "#/components/schemas/OutputEvent"},
              {"$ref": "#/components/schemas/ExitedEvent"},
              {"$ref": "#/components/schemas/ErrorEvent"}
            ]
          },
          "Error": {
            "type": "object",
            "required": ["error", "field", "id"],
            "properties": {
              "error": {"type": "string", "description": "What went wrong and what to do."},
              "field": {"type": ["string", "null"], "description": "The request field at fault (argv[1], env.NAME), for a 400."},
              "id": {"type": "string"}
            }
          },
          "PoolStatus": {
            "type": "object",
            "required": ["size", "ready", "booting", "busy", "queued", "maxConcurrent", "draining"],
            "properties": {
              "size": {"type": "integer"},
              "ready": {"type": "integer"},
              "booting": {"type": "integer"},
              "busy": {"type": "integer"},
              "queued": {"type": "integer"},
              "maxConcurrent": {"type": "integer"},
              "draining": {"type": "boolean"}
            }
          },
          "Health": {
            "type": "object",
            "required": ["status", "pool", "inFlight"],
            "properties": {
              "status": {"enum": ["ok", "draining"]},
              "pool": {"$ref": "#/components/schemas/PoolStatus"},
              "inFlight": {"type": "integer"}
            }
          }
        }
      }
    }
    """#
}
