// The API docs page: Swagger UI (vendored, static/vendor/README.md) over the gateway's own
// document. No validator badge: it would call a third-party server for every load.
"use strict";
window.ui = SwaggerUIBundle({
  url: "/api/v1/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
