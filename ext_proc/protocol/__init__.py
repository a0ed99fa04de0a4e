"""The Envoy side: ext_proc messages, the per-request state machine, spendgate's own answers."""
