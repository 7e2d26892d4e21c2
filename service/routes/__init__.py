"""One router per resource: v1 (KServe v1 + :embed), v2 (Open Inference Protocol), health, admin."""
