"""The admin API: remote administration of the installation (function 4 of the reference product).

Served by smgw-link on the local network (``admin:`` section) and behind the SMGW's inbound
channel (paths under ``/v1``). See :mod:`smgw_link.admin.app` for the routes and roles,
:mod:`smgw_link.admin.core` for how configuration changes are applied.
"""
