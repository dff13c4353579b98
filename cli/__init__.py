"""The `loraflow` command: entry points above the flow (parse, preflight, start the flow; serve the webhook)."""
