// Command istio-webhook serves Istio's own validating admission webhook (the one istiod serves at
// /validate) on a plain TLS listener, without istiod, so the local control plane refuses the
// VirtualServices and DestinationRules a real Istio would refuse. See README.md.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"istio.io/istio/pkg/config/schema/collections"
	istiolog "istio.io/istio/pkg/log"
	"istio.io/istio/pkg/webhooks/validation/server"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9443", "address to serve HTTPS on")
	certFile := flag.String("tls-cert-file", "", "serving certificate (PEM)")
	keyFile := flag.String("tls-private-key-file", "", "serving certificate's key (PEM)")
	domainSuffix := flag.String("domain-suffix", "cluster.local", "cluster DNS domain suffix, as istiod's --domain")
	flag.Parse()
	if *certFile == "" || *keyFile == "" {
		fmt.Fprintln(os.Stderr, "istio-webhook: --tls-cert-file and --tls-private-key-file are required")
		os.Exit(2)
	}
	if err := istiolog.Configure(istiolog.DefaultOptions()); err != nil {
		fmt.Fprintf(os.Stderr, "istio-webhook: logging: %v\n", err)
		os.Exit(1)
	}

	mux := http.NewServeMux()
	// The same schemas and handler istiod registers (pilot/pkg/bootstrap/validation.go): decoding,
	// crd.ConvertObject, the schema's ValidateConfig, warnings and messages are all Istio's.
	if _, err := server.New(server.Options{
		Schemas:      collections.PilotGatewayAPI(),
		DomainSuffix: *domainSuffix,
		Mux:          mux,
	}); err != nil {
		fmt.Fprintf(os.Stderr, "istio-webhook: %v\n", err)
		os.Exit(1)
	}
	mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })

	srv := &http.Server{
		Addr:              *listen,
		Handler:           mux,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	fmt.Fprintf(os.Stderr, "istio-webhook: serving https://%s/validate\n", *listen)
	if err := srv.ListenAndServeTLS(*certFile, *keyFile); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintf(os.Stderr, "istio-webhook: %v\n", err)
		os.Exit(1)
	}
}
