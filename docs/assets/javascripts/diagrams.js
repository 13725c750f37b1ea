// Mermaid diagrams that follow the palette: mermaid's "default" theme on Material's light scheme,
// its "dark" theme on slate, drawn again whenever the reader toggles the palette.
//
// Material would render each `pre.mermaid` once, into a closed shadow root, with colours of its
// own that mermaid 12's diagrams partly override (pale boxes under pale text on slate). This file
// runs before Material mounts the page (it is an extra_javascript, loaded before DOMContentLoaded
// with the content already parsed) and takes the diagrams over; the mermaid library itself is the
// script mermaid2 adds after it.
(() => {
  const diagrams = [...document.querySelectorAll("pre.mermaid")].map((pre) => {
    const host = document.createElement("div");
    host.className = "mermaid";
    host.dataset.source = pre.textContent;
    pre.replaceWith(host);
    return host;
  });
  if (diagrams.length === 0) return;

  // Where mermaid's dark theme puts light grey text on mid grey (edge labels, notes: a contrast
  // of 4.4), darker backgrounds and lighter text bring it to WCAG AA (4.5) and beyond.
  const THEME_VARIABLES = {
    default: {},
    dark: { edgeLabelBackground: "#2f3136", noteBkgColor: "#3b3d42", noteTextColor: "#e6e6e6" },
  };
  const theme = () =>
    document.body.getAttribute("data-md-color-scheme") === "slate" ? "dark" : "default";
  let drawn = null;
  let queue = Promise.resolve();

  async function draw() {
    const wanted = theme();
    if (wanted === drawn) return;
    drawn = wanted;
    mermaid.initialize({
      startOnLoad: false,
      theme: wanted,
      themeVariables: THEME_VARIABLES[wanted],
      suppressErrorRendering: true,
    });
    for (const [index, host] of diagrams.entries()) {
      try {
        const { svg, bindFunctions } = await mermaid.render(`diagram-${index}`, host.dataset.source);
        host.innerHTML = svg;
        bindFunctions?.(host);
      } catch (error) {
        // On the page, and in the console where the site's browser test looks (tests/browser.py).
        const message = `mermaid diagram ${index + 1} of ${location.pathname}: ${error.message ?? error}`;
        console.error(message);
        host.textContent = message;
      }
      host.dataset.theme = wanted; // drawn, or tried, in this theme
    }
  }

  const schedule = () => {
    queue = queue.then(draw);
  };
  document.addEventListener("DOMContentLoaded", schedule);
  new MutationObserver(schedule).observe(document.body, {
    attributes: true,
    attributeFilter: ["data-md-color-scheme"],
  });
})();
