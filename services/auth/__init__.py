"""Authorization shared by scanwatch's HTTP services: SMART-style scopes and grants
(``scopes``), access tokens (``tokens``: what every service needs to verify a bearer token),
the registered clients (``clients``) and the OAuth 2.0 token endpoint (``routes``).

The FHIR API serves the token endpoint today; the coming authorization server grows from this
package. Nothing here imports the FHIR API.
"""
