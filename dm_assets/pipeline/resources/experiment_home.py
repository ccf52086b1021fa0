"""Where experiments keep their data, as a resource the assets share."""

import dagster as dg


class HomeResource(dg.ConfigurableResource):
    """Where experiments keep their data: ``$DM_HOME`` (default ``.dm/``) unless set here."""

    path: str = ""
