// Grantline dashboard: conveniences only; every page works without this script.
'use strict';
document.addEventListener('DOMContentLoaded', () => {
  // Filters apply as soon as a choice changes.
  for (const select of document.querySelectorAll('form.filters select')) {
    select.addEventListener('change', () => select.form.requestSubmit());
  }
  // "/" focuses the search box, as on most consoles.
  const search = document.querySelector('input[type="search"]');
  document.addEventListener('keydown', (event) => {
    const typing = event.target.closest('input, textarea, select');
    if (search && event.key === '/' && !typing) {
      event.preventDefault();
      search.focus();
    }
  });
});
