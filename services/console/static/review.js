// The study page's review panel: its content (the AI result and the signing form) is loaded
// from the console (same origin, the session cookie); without script, the panel's link opens
// the same form on a page of its own.
"use strict";
document.querySelectorAll("[data-review-src]").forEach(async (box) => {
  try {
    const answer = await fetch(box.dataset.reviewSrc, {
      credentials: "same-origin",
      headers: { Accept: "text/html" },
    });
    if ((answer.headers.get("content-type") || "").startsWith("text/html")) {
      box.innerHTML = await answer.text(); // rendered and escaped by the console's templates
      box.dataset.loaded = "true";
    }
  } catch (error) {
    // The link stays: the form on its own page.
  }
});
