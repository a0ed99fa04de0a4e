"""The local view of policies and spend, kept in step with the control plane; usage sent durably."""
