"""Deployment event notifications (webhooks): events derived from the deployment history, a
transactional outbox in the store, and a sender with retries. See docs/notifications.md."""

from .events import EVENTS, FORMATS, WebhookTarget
from .outbox import Notifier

__all__ = ["EVENTS", "FORMATS", "Notifier", "WebhookTarget"]
