"""Broker implementations behind one protocol (`cuebx.brokers.base.Broker`)."""
