#!/bin/sh
# Example: send a device's cloud traffic to pvtap on THIS host with iptables REDIRECT.
# Run as root on the host where pvtap runs, which must also be the device's gateway (or receive
# its traffic through a policy route on the router, see README.md). Adjust the three values.
# The relay then reads each connection's original destination (SO_ORIGINAL_DST): use
# policy = "transparent" for its listeners. Undo: replace -A by -D and run again.
set -eu

LAN_IF=eth0               # interface the device's traffic arrives on
DEVICE=192.0.2.10         # the device's address (one rule set per device; omit -s for all)
DEVICE6=2001:db8::10      # its IPv6 address, if it has one

sysctl -qw net.ipv4.ip_forward=1                 # the device's other traffic still goes out
sysctl -qw net.ipv6.conf.all.forwarding=1
sysctl -qw net.ipv4.conf.all.send_redirects=0    # do not tell the device to bypass this host

# AlphaESS battery → pvtap relay (listener alphaess on *:7777, policy transparent)
iptables  -t nat -A PREROUTING -i "$LAN_IF" -s "$DEVICE"  -p tcp --dport 7777 -j REDIRECT --to-ports 7777
ip6tables -t nat -A PREROUTING -i "$LAN_IF" -s "$DEVICE6" -p tcp --dport 7777 -j REDIRECT --to-ports 7777

# Enphase Envoy → mitmproxy of `pvtap run` (enphase.mode = transparent, enphase.listen 0.0.0.0:8443)
# iptables -t nat -A PREROUTING -i "$LAN_IF" -s "$DEVICE" -p tcp --dport 443 -j REDIRECT --to-ports 8443
