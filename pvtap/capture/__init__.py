"""`pvtap import`: decode pcap/pcapng captures of device traffic as if it had come through pvtap.

reader (the file) → packets (headers) → tcp (streams back in order) → importer (protocol choice,
the same Taps, redaction and store as live traffic; http for Enphase over plain HTTP).
"""
