//! Built-in sample articles (Spanish newspapers and sections) used when no
//! `--articles FILE` is given.

use crate::article::Article;

/// (newspaper, section, title, content)
const SAMPLES: &[(&str, &str, &str, &str)] = &[
    (
        "eldiario",
        "futbol",
        "El Alavés en descenso",
        "El Alavés pelea por no descender.",
    ),
    (
        "marca",
        "futbol",
        "El Real Madrid remonta en el Bernabéu",
        "Dos goles en los últimos diez minutos dan la victoria a los blancos ante el Girona.",
    ),
    (
        "as",
        "futbol",
        "El Atlético cierra el fichaje de un central",
        "El club rojiblanco confirma la incorporación del defensa hasta 2028.",
    ),
    (
        "elpais",
        "futbol",
        "La selección femenina prepara la Liga de Naciones",
        "La seleccionadora convoca a 23 jugadoras para los partidos de febrero.",
    ),
    (
        "elmundo",
        "futbol",
        "El Betis sueña con Europa",
        "Los verdiblancos suman cinco victorias seguidas y se acercan a la quinta plaza.",
    ),
    (
        "marca",
        "baloncesto",
        "El Unicaja gana la Copa del Rey",
        "Los malagueños se imponen en una final igualada hasta el último segundo.",
    ),
    (
        "as",
        "baloncesto",
        "Triple doble histórico en la ACB",
        "El base del Baskonia firma 15 puntos, 12 rebotes y 11 asistencias.",
    ),
    (
        "elpais",
        "politica",
        "El Congreso aprueba la reforma de la ley de vivienda",
        "La norma sale adelante con el apoyo de cinco grupos parlamentarios.",
    ),
    (
        "eldiario",
        "politica",
        "Los ayuntamientos piden más financiación",
        "La Federación de Municipios reclama un nuevo modelo antes del verano.",
    ),
    (
        "elmundo",
        "economia",
        "El paro baja por tercer mes consecutivo",
        "La afiliación a la Seguridad Social marca un nuevo récord en marzo.",
    ),
    (
        "elpais",
        "economia",
        "El Banco Central Europeo mantiene los tipos de interés",
        "La presidenta del BCE descarta nuevas bajadas mientras la inflación no se modere.",
    ),
    (
        "eldiario",
        "tecnologia",
        "Una universidad española lanza un satélite de órbita baja",
        "El pequeño satélite medirá la humedad del suelo para mejorar el riego.",
    ),
    (
        "elmundo",
        "tecnologia",
        "Las redes 5G llegan a los pueblos de menos de mil habitantes",
        "El plan de conectividad rural prevé cubrir el 95% del territorio en dos años.",
    ),
    (
        "as",
        "tecnologia",
        "Los clubes apuestan por el análisis de datos",
        "Sensores y cámaras miden cada carrera de los jugadores durante el partido.",
    ),
    (
        "eldiario",
        "economia",
        "El precio del aceite de oliva empieza a bajar",
        "La buena cosecha abarata la garrafa de cinco litros en los supermercados.",
    ),
];

/// The catalogue as articles with ids like `sample-01` (the publisher assigns a fresh
/// id to every publication) and an empty `published_at` (set when published).
pub fn builtin_articles() -> Vec<Article> {
    SAMPLES
        .iter()
        .enumerate()
        .map(|(i, (newspaper, section, title, content))| Article {
            id: format!("sample-{:02}", i + 1),
            newspaper: (*newspaper).to_owned(),
            section: (*section).to_owned(),
            title: (*title).to_owned(),
            content: (*content).to_owned(),
            published_at: String::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn catalogue_is_varied_and_valid() {
        let articles = builtin_articles();
        assert!(articles.len() >= 12);
        for a in &articles {
            assert_eq!(a.validate(), Ok(()), "{a:?}");
        }
        let newspapers: HashSet<_> = articles.iter().map(|a| a.newspaper.as_str()).collect();
        let sections: HashSet<_> = articles.iter().map(|a| a.section.as_str()).collect();
        for n in ["eldiario", "elpais", "marca", "as"] {
            assert!(newspapers.contains(n), "{n}");
        }
        for s in ["futbol", "baloncesto", "politica", "economia", "tecnologia"] {
            assert!(sections.contains(s), "{s}");
        }
        assert!(articles.iter().filter(|a| a.section == "futbol").count() >= 4);
        let ids: HashSet<_> = articles.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids.len(), articles.len(), "ids are unique");
    }
}
