"""The read-only web view of the local stores (`pvtap web`, started by `pvtap run`).

It runs in a process of its own and only reads the stores (SQLite, read-only), so nothing it
does, however large the store or however many browsers poll it, reaches the forwarding path.
`quantities` says which decoded fields are PV, battery, grid and house power, SoC and
temperatures; `readings` builds the devices, current values and health; `series` the charts;
`server` serves them with the page in `static/`.
"""
