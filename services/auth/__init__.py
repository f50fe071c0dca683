"""Authorization shared by scanwatch's HTTP services: SMART-style scopes and grants
(``scopes``), access tokens (``tokens``: ES256, the signing key set, what every service needs
to verify a bearer token), verification from the published keys for processes that hold no
signing key (``jwks``), the registered clients (``clients``) and the OAuth 2.0 token endpoint
and JWKS (``routes``).

The FHIR API serves the token endpoint today; the coming authorization server grows from this
package. Nothing here imports the FHIR API.
"""
