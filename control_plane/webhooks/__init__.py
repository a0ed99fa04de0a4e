"""Webhooks: budget events delivered durably to receivers.

events.py      pure: which crossings a window's spend has reached; payload data
outbox.py      in the usage transaction: event rows + one delivery per webhook
formats.py     pure: GENERIC envelope, Slack message, PagerDuty Events v2
signing.py     pure: Standard Webhooks secrets and signatures
ssrf.py        which URLs and addresses may be called (checked again at send time)
sender.py      one HTTP attempt with httpx (the only module doing webhook I/O)
backoff.py     pure: when to try again (exponential, jitter, Retry-After)
dispatcher.py  claims due deliveries, sends them, records every attempt
convert.py     spendgate.v1 Webhook messages <-> rows, with validation
service.py     the admin use cases, one transaction each
"""
