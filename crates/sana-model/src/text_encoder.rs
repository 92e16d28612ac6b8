//! Gemma-2 text encoder and Sana prompt encoding: arrive with their issue.
