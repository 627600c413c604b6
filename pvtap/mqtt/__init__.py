"""MQTT with Home Assistant discovery, published from the local stores (docs/mqtt.md).

    catalog.py    which records become which sensors (pure)
    state.py      the devices' latest state, counters guarded (pure)
    discovery.py  topics and discovery payloads (pure)
    follow.py     a store's records after the MQTT cursor, and the persisted state
    publisher.py  the broker connection: follow, publish, reconnect
    thread.py     the publisher in a thread of its own (the ingest worker runs it so)
"""
