"""Framework-free pieces shared by jaxlora and torchlora (private: import from either)."""
